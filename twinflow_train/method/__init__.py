"""The TwinFlow objective and what it is built from: the flow scheduler, time samplers, few-step samplers and the EMA target."""
