"""Lightning's side: the LightningModule (module.py), the project's callbacks (callbacks.py) and `embed`'s
prediction loop over a checkpoint (prediction.py)."""
