# The pgrelief operator image.
#
# Stage 1 builds pgrelief's wheel and installs it, with its runtime dependencies only (no
# extras), into a virtualenv; every dependency must come as a wheel (--only-binary), so no
# compiler is ever needed. Stage 2 is the bare base plus that virtualenv, run as a non-root
# user. BASE_IMAGE needs python3 (3.11+) with its venv module; both stages use it, so the
# virtualenv's interpreter path is valid in the final image.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /opt/pgrelief \
    && /opt/pgrelief/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist /src \
    && /opt/pgrelief/bin/pip install --no-cache-dir --only-binary=:all: /dist/pgrelief-*.whl \
    && /opt/pgrelief/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 pgrelief \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pgrelief
COPY --from=build /opt/pgrelief /opt/pgrelief
ENV PATH=/opt/pgrelief/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["pgrelief"]
# The chart passes its own arguments (namespaces, peering, ports, probes).
CMD ["operator", "--all-namespaces", "--log-format", "json"]
