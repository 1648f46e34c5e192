"""A trained model and its preprocessing contract: the contract and the embeddings file (contract.py, NumPy only),
checkpoints opened once (checkpoints.py), a .onnx/.pt/.ckpt loaded as an embedding function (inference.py)."""
