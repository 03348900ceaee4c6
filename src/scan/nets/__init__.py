"""Networks: backbones and clustering heads (models), pretrained EfficientNet-Lite, heads on cached
features, augmentations run on the device, and weight averages (momentum encoders, EMA)."""
