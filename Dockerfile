# The kuberun_trio gateway image (docs/deploy.md):
#   docker build -t kuberun-trio:0.1.0 .
#
# Two stages on the same official slim Python image, pinned by tag (pin it by digest too,
# `python:3.12.8-slim-bookworm@sha256:...`, for byte-for-byte rebuilds). The build stage
# installs the package from this source tree into a virtualenv (the only network access
# is the package index, for the dependencies); the runtime stage copies that virtualenv
# and runs it as an unprivileged user with a fixed UID, which the Deployment's
# securityContext (runAsUser 10001) matches.

FROM python:3.12.8-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/kuberun-trio
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kuberun_trio ./kuberun_trio
# pip compiles the bytecode here: at run time the root filesystem is read-only.
RUN /opt/kuberun-trio/bin/pip install . \
    && /opt/kuberun-trio/bin/python -m kuberun_trio --version

FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="kuberun_trio" \
      org.opencontainers.image.description="SSH gateway that gives every SSH connection its own Kubernetes pod" \
      org.opencontainers.image.licenses="MIT"
# The state dir holds a generated host key only when none is configured; in Kubernetes it
# is an emptyDir (the root filesystem is read-only) and the host keys come from a Secret.
RUN groupadd --system --gid 10001 kuberun \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/kuberun-trio --shell /usr/sbin/nologin kuberun \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/kuberun-trio
COPY --from=build /opt/kuberun-trio /opt/kuberun-trio
ENV PATH=/opt/kuberun-trio/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/kuberun-trio \
    XDG_STATE_HOME=/var/lib
WORKDIR /var/lib/kuberun-trio
USER 10001:10001
# 2222 SSH; 9100 metrics (/metrics); 7000 health (/healthz, /readyz) once enabled.
EXPOSE 2222 9100 7000
ENTRYPOINT ["python", "-m", "kuberun_trio"]
# With no arguments the server would start its demo (an embedded cluster on 127.0.0.1),
# which is of no use in a container: print the usage instead. The Deployment passes
# --config.
CMD ["--help"]
