# flasma-ws on CPU: python:3.11-slim with tensorflow-cpu (no CUDA libraries), non-root.
#
#   docker build -t flasma-ws .
#   docker run -p 8080:8080 flasma-ws                     # demo set: 10,000 vectors of dim 100
#   docker run -p 8080:8080 -v "$PWD/data:/data:ro" flasma-ws --npy /data/vectors.npy
#
# Every flag of `flasma-ws serve` is also an environment variable FLASMA_<NAME>. Change the port
# with -e FLASMA_PORT (the HEALTHCHECK reads it too), not with --port.
FROM python:3.11-slim

ARG TENSORFLOW="tensorflow-cpu==2.21.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    FLASMA_HOST=0.0.0.0 \
    FLASMA_PORT=8080

WORKDIR /src
COPY pyproject.toml README.md ./
COPY flasma_ws ./flasma_ws
# tensorflow-cpu stands in for the "tensorflow" requirement: the other requirements are read
# from pyproject.toml, then the package itself goes in without dependencies.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('tensorflow')))" > /tmp/requirements.txt \
 && pip install "$TENSORFLOW" -r /tmp/requirements.txt \
 && pip install --no-deps . \
 && rm -rf /src /tmp/requirements.txt

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flasma
USER 10001
WORKDIR /home/flasma

EXPOSE 8080
# python, not curl (slim has none). https when FLASMA_CERTFILE is set; 503 (loading, draining)
# and a closed port both fail the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = bool(os.environ.get('FLASMA_CERTFILE')); r.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('FLASMA_PORT', '8080') + '/healthz', timeout=4, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["flasma-ws", "serve"]
CMD ["--dim", "100"]
