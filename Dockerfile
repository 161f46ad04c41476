# The image the Kubernetes manifests run (deploy/kubernetes): vLLM's OpenAI server image, at the
# vLLM version this package supports, plus this package's wheel with the clients of the stores
# in EXTRAS. The wheel comes from `make dist`; then, from the repository's root:
#
#   make dist
#   docker build -t registry.example.com/vllm-lora:0.1.0-vllm0.32.0 .
#
# (--build-arg EXTRAS=s3 for an image with one store's client only). tests/test_dist.py runs this
# file's pip install, as written here, against the wheel it builds.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# The clients of these stores (the package's extras): every store by default.
ARG EXTRAS=s3,gcs,azure,hf
# Where the wheel is copied to be installed.
ARG WHEELS=/tmp/vllm-lora-wheels

COPY dist/*.whl ${WHEELS}/
# The wheel `make dist` built, with its extras' clients (from the package index).
RUN python3 -m pip install --no-cache-dir "$(echo ${WHEELS}/vllm_lora_resolvers-*.whl)[${EXTRAS}]"
