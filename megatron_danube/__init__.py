"""megatron_danube: pretrain H2O-Danube-class models on Megatron-Core."""

__version__ = "0.1.0"
