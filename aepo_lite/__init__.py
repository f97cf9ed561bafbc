"""aepo_lite: energy-guided diffusion policies (AEPO, QGPO/CEP) for offline RL, small and tested."""
from aepo_lite.device import resolve_device, seed_everything
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.core.diffusion import DiffusionModel, sample, energy_guidance

__version__ = "0.1.0"
__all__ = ["resolve_device", "seed_everything", "VPSchedule", "DiffusionModel", "sample", "energy_guidance",
           "__version__"]
