# sims on CUDA GPUs. Build: docker build -t sims .
# Run:   docker run --gpus all --ipc=host -v $PWD/runs:/work/runs -v /data:/data sims \
#          sims-train configs/cifar10.yaml run_dir=runs/cifar10 data.path=/data/cifar10-32x32.zip
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline

WORKDIR /work
COPY pyproject.toml README.md ./
COPY sims ./sims
COPY configs ./configs
# The image's CUDA torch satisfies the torch requirement; the fid extra adds torchvision + torch-fidelity.
RUN pip install -e ".[fid,test]"

CMD ["sims-train", "--help"]
