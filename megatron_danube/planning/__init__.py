"""Layout planning: predicted memory per GPU and step time of a parallel layout, before a run.

`hardware` (GPU specifications), `efficiency` (the achieved fractions of peak, calibrated from
the throughput benchmark), `memory` (weights, gradients and optimizer state as megatron-core
allocates them, activations per micro-batch), `speed` (step time, tokens/s, MFU) and `search`
(every layout the project's checks accept, ranked). `danube-plan` is the command.
"""
