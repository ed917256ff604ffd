"""Run a training script under accelerate's FSDP on CPU processes (gloo): ``accelerate launch --config_file
configs/fsdp.yaml --multi_gpu ... tests/fsdp_on_cpu.py <script> <args>`` with ACCELERATE_USE_CPU=1.

accelerate 1.15 turns FSDP on only for GPU-like devices: with ACCELERATE_USE_CPU=1 its AcceleratorState says
MULTI_CPU and ignores the FSDP plugin that the launch built from the config. torch itself runs FSDP2 on CPU over
gloo, so this shim (tests only) sets the state to FSDP with that plugin, exactly what accelerate does on GPUs, and
then runs the script unchanged. Everything after that (fully_shard, the state dicts, save/load_state) is
accelerate's and torch's own code path.
"""

import os
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType

_initialise = accelerate.state.AcceleratorState.__init__


def _initialise_with_fsdp(self, *args, **kwargs):
    _initialise(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does
        self.fsdp_plugin = plugin
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)


accelerate.state.AcceleratorState.__init__ = _initialise_with_fsdp
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
