# The image runs the README's own install step (`make install`), so the two cannot drift apart.
FROM python:3.11-slim-bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY live ./live
COPY protocol ./protocol
COPY clients ./clients
RUN make install
# Without LIVEVOICE_TOKENS (or a tokens file) the server refuses to listen beyond loopback,
# which inside a container means nobody can reach it: pass tokens at `docker run`.
ENV LIVEVOICE_HOST=0.0.0.0 LIVEVOICE_DATA_DIR=/data
VOLUME /data
EXPOSE 8765
CMD [".venv/bin/livevoice", "serve"]
