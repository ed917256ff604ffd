r"""The name the authors' current release gives stage 2 (lzc-sg/PureCC, ``train_stage2_sd3.py``): the same script as
train_stage2_v2_sd3.py, so the release's commands run here as they are written.

    accelerate launch train_stage2_sd3.py --pretrained_model_name_or_path SD3.5 --data_path data \
        --csv_name robot_toy.csv --output_dir ./output --stage1_output_dir ./output/base_ckpt ...
"""

from train_stage2_v2_sd3 import main
from utils.checks import exit_on_error

if __name__ == "__main__":
    exit_on_error(main)
