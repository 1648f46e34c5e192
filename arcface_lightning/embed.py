"""Embed: L2-normalised embeddings of any images, or of a split of the checkpoint's data set, into one .npz file.

    python -m arcface_lightning.embed ckpt_path=<run>/checkpoints/<best>.ckpt input=<folder|list.csv|image> output=q.npz
    python -m arcface_lightning.embed ckpt_path=model.onnx input=<folder|list.csv|image> output=q.npz  # an export
    python -m arcface_lightning.embed ckpt_path=<ckpt> split=train output=gallery.npz   # the checkpoint's data set
    python -m arcface_lightning.embed ckpt_path=<ckpt> split=test data.root=/data/faces output=test.npz

`ckpt_path`: a checkpoint (.ckpt), or an export (.onnx, or TorchScript .pt/.ts) of one with `input=`. `input=`: a
folder of class folders (labels and class names from the folder names), a folder of images (labels -1), a CSV list
(`path,label`) or one image, decoded to the model's image size and channels. Without `input`, `split=train|val|test`
of the checkpoint's data set (located by `data.*` as in evaluate; a .ckpt only: an export does not know its data
set); its sources are `<split>:<index>` in the split's order.

With a .ckpt, images go through Lightning's `Trainer.predict` and the module's `predict_step` (prediction.py), so
`trainer.*` (devices, precision, DDP) works as in training; batches are uint8 and are normalised on the device by the
contract in the checkpoint (contract.Contract), exactly as in training. Loading a .ckpt imports Lightning (seconds
more at start). With an export, the images are embedded in this process, `data.eval_batch_size` at a time
(inference.load_model, inference.embed_files; `trainer.*` and `data.num_workers` are not used), without Lightning: an
ONNX file through ONNX Runtime (pip install "arcface-lightning[onnx]"). A TorchScript file is a program: loading it
runs the code it holds, so give only files you trust.

The file (contract.save_embeddings), read with NumPy alone: `np.load(path)` → `embeddings` float32 (N, D), `labels`
int64, `sources`, `classes`, `contract` (JSON, with the SHA-256 of the model's weights: search refuses to compare
embeddings of two models), `model` (the ckpt_path). `output` is checked before any work (not a folder, in a folder
that can be written) and written aside: a failure, Ctrl-C or SIGTERM leaves neither it nor the ranks' shares behind.
Why .npz rather than Parquet: a float matrix and a few string arrays, read with no extra dependency and no pickle,
memory-mappable by `np.load(..., mmap_mode="r")` once unzipped. Embeddings are collected on the host (N × D × 4
bytes) and written once; under DDP each rank writes its share aside, rank zero merges them in sample order and drops
the distributed sampler's padding repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arcface_lightning.core.config import ConfigError
from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.core.writing import check_output
from arcface_lightning.serving.contract import EXPORT_SUFFIXES, save_embeddings
from arcface_lightning.serving.inference import embed_files, index_inputs, load_model, with_flip

SPLITS = ("train", "val", "test")


def embed(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    output = Path(cfg.output)
    if output.suffix != ".npz":
        raise ConfigError(f"output={output}: embeddings are written as .npz; give a file name ending in .npz")
    if cfg.input is None and cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} is not one of {', '.join(SPLITS)} (or give input=<images>)")
    ckpt_path = str(cfg.ckpt_path)
    export = Path(ckpt_path).suffix in EXPORT_SUFFIXES
    if export and cfg.input is None:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is an export; this command needs a .ckpt checkpoint of training to embed "
            f"split={cfg.split} (an export does not know its data set): give input=<images>, or a .ckpt"
        )
    check_output(output)
    if export:  # in this process, without Lightning
        model, contract = load_model(ckpt_path)
        sources, labels, classes = index_inputs(cfg.input)
        model = with_flip(model) if cfg.get("flip") else model
        embeddings = embed_files(model, contract, sources, cfg.data.eval_batch_size)
    else:
        from arcface_lightning.serving.checkpoints import Checkpoint  # torch and Lightning: only for a checkpoint
        from arcface_lightning.training.prediction import predict

        checkpoint = Checkpoint(ckpt_path)  # opened once, memory-mapped
        contract = checkpoint.contract
        predicted = predict(cfg, checkpoint, output)
        if predicted is None:  # not rank zero: rank zero writes the file
            return {}
        embeddings, labels, sources, classes = predicted
    save_embeddings(output, embeddings, labels, sources, contract, ckpt_path, classes)
    print(f"{output}: {len(embeddings)} embeddings of size {embeddings.shape[1]}")
    return {"output": str(output), "embeddings": len(embeddings), "embedding_size": int(embeddings.shape[1])}


main, cli = entry_point("embed", embed)


if __name__ == "__main__":
    cli()
