"""Stages: the steps of a trial, each taking values in and giving values out.

``model`` (torch), ``data`` (corpora, tokenizers, batches), ``train`` (brief training, BPB),
``export`` (ONNX with a KV cache, quantization, reweighting), ``measure`` and ``measure_worker``
(ONNX Runtime in an isolated process), ``estimate`` (per-device latency-model estimates for other devices),
``score`` (BPB of the quantized ONNX model), ``hf`` (Hugging Face and litgpt configs).

May import: ``nas.spec`` and ``nas.stages``. Never the store, the search, the winner or a face.
"""
