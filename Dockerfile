# The relay server image: slim Python, dependencies from requirements.lock (runtime only, written
# by .ci/lock), non-root user, data on a volume. Build: docker build -t relay .   Run: see
# docs/operations.md.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Dependencies first (their layer survives code changes), exactly the versions CI tests
# (requirements-dev.lock holds the same pins plus the test and bench tools).
COPY requirements.lock ./
RUN python -m venv /opt/relay \
 && /opt/relay/bin/pip install --no-cache-dir --require-virtualenv -r requirements.lock
COPY pyproject.toml README.md docker/build-constraints.txt ./
COPY relay ./relay
COPY loadgen ./loadgen
# The build backend pinned too (pip applies PIP_CONSTRAINT inside its isolated build env).
RUN PIP_CONSTRAINT=/src/build-constraints.txt /opt/relay/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/relay/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /opt/relay /opt/relay
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
 && mkdir -p /var/lib/relay /etc/relay \
 && chown relay:relay /var/lib/relay
COPY docker/relay.toml /etc/relay/relay.toml
USER 10001:10001
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]
# SMTP, IMAP, POP3, metrics (+ /healthz); as in docker/relay.toml
EXPOSE 2525 1143 1110 9325
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9325/healthz', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve", "--config", "/etc/relay/relay.toml"]
