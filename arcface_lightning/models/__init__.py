"""The model's parts as plain `nn.Module`s, with no Lightning and no Hydra: the margin heads (heads.py: ψ and the
classic five; recent_heads.py: sub-centres, AdaFace, ElasticFace, CurricularFace), Partial FC (partial_fc.py) and the
backbones (backbones.py; face_backbones.py: IResNet, MobileFaceNet)."""
