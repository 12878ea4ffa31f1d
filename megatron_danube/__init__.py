"""megatron_danube: pretrain H2O-Danube-class models on Megatron-Core."""

import warnings

# megatron-core warns at import time whenever neither TE nor apex is installed (every CPU run
# and the no-TE GPU path); that is expected here, and the fallback is reported where it matters.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__version__ = "0.2.0"
