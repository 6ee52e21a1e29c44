"""The emotion model: read the GoEmotions files, fine-tune MiniLM, evaluate any checkpoint, export ONNX.

Submodules import torch and transformers lazily where they can; importing this package is cheap.
"""
