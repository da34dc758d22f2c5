"""Stage 4, train: the torch side — the ONNX ↔ torch bridge, the masked stand-in of a pruned model, fine-tuning with
distillation, recalibration, the non-finite guard, checkpoint/resume, multi-process training, and int8 (measured
choice of layers and quantization-aware training).

May import the stages below (core, graph, cost, optimize); torch is imported here (and in `onnxecc.methods`) only,
and only where a module trains. No re-exports here: importing the package does not import torch.
"""
