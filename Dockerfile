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
ENV LIVEVOICE_HOST=0.0.0.0
EXPOSE 8765
CMD [".venv/bin/livevoice", "serve"]
