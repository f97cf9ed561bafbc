"""Core maths and models: the VP schedule, the networks, the diffusion model and its samplers, the
guidance maths (pure functions), AEPO and its baselines' energy losses, and the critics."""
