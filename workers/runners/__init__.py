"""What differs per runner (workers/runners/base.py): one process (`LocalRunner`), a Ray
Train rank with DDP or DeepSpeed (`ray_train.RayTrainRunner`, `deepspeed`)."""
