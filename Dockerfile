# The sferp image: `sferp run` as one process of a Bytewax cluster (see docker-compose.yml).
#   docker build -t sferp .
#   docker run --rm sferp --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sferp
COPY pyproject.toml README.md ./
COPY sferp ./sferp
COPY flows ./flows
COPY operators ./operators
COPY connectors ./connectors
COPY benchmarks ./benchmarks
RUN pip install . && rm -rf /root/.cache

# State lives in volumes: the Bytewax recovery store (shared by every process of
# the cluster) and the DuckDB views (process 0, the single writer). The directories
# exist in the image, owned by the runtime user, so new named volumes inherit that.
RUN useradd --system --uid 10001 --home-dir /var/lib/sferp sferp \
    && mkdir -p /var/lib/sferp/recovery /var/lib/sferp/views \
    && chown -R sferp:sferp /var/lib/sferp
USER sferp
WORKDIR /var/lib/sferp
VOLUME ["/var/lib/sferp/recovery", "/var/lib/sferp/views"]

ENV SFERP_VIEWS__PATH=/var/lib/sferp/views/views.duckdb \
    SFERP_METRICS__BIND=0.0.0.0

# Prometheus metrics: 9464 + the process id (-i); Bytewax cluster traffic: 2101.
EXPOSE 9464 9465 2101

# SIGTERM (docker stop): finish the epoch, flush, snapshot, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sferp"]
CMD ["run", "--recovery-dir", "/var/lib/sferp/recovery"]
