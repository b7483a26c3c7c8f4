# VendePass server (and, with another command, its client).
#   docker build -t vendepass .
#   docker run -d --name vendepass -p 65432:65432 -v vendepass-data:/data vendepass
# Several servers on one PostgreSQL database behind HAProxy: docker-compose.yml
# runs this image with `--db postgresql://...` (docs/deployment.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /tmp/vendepass
RUN pip install /tmp/vendepass \
    && rm -rf /tmp/vendepass \
    # Build Twisted's plugin cache now: the non-root user cannot write it later.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home vendepass \
    && mkdir /data \
    && chown vendepass:vendepass /data

USER vendepass
WORKDIR /data
# The SQLite database (and its WAL) lives here: keep it on a volume. (With
# PostgreSQL nothing is written here.)
VOLUME ["/data"]
EXPOSE 65432

CMD ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "vendepass", "--listen", "tcp:65432", "--db", "/data/vendepass.sqlite3"]
