"""arcface-lightning: angular-margin embedding models (ArcFace and its family) with Lightning and Hydra.

heads.py (the margin math) → backbones.py → module.py (LightningModule) ← data/ (LightningDataModule);
train.py / evaluate.py are the Hydra entry points, configs in conf/.
"""

__version__ = "0.1.0"
