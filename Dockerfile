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

# The dependencies first, in a layer of their own, from setup.cfg alone: a
# change to the code does not install them again.
COPY setup.cfg pyproject.toml /tmp/vendepass/
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('/tmp/vendepass/setup.cfg'); print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package itself, without dependencies (pip check: none is missing).
COPY . /tmp/vendepass
RUN pip install --no-deps /tmp/vendepass \
    && pip check \
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

# Healthy while the server answers on its port: the welcome line, then a
# ping (opcode 0) answered. For the command below (plain tcp:65432);
# docker-compose.yml, whose servers listen for the PROXY protocol, has its own.
HEALTHCHECK --interval=30s --timeout=6s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import json, socket; s = socket.create_connection(('127.0.0.1', 65432), timeout=5); s.sendall(json.dumps(dict(opcode=0, id='health')).encode() + bytes([10])); f = s.makefile('rb'); assert json.loads(f.readline())['event'] == 'welcome', 'no welcome'; assert json.loads(f.readline())['ok'], 'no answer to ping'"]

CMD ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "vendepass", "--listen", "tcp:65432", "--db", "/data/vendepass.sqlite3"]
