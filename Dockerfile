# cxr-stream image: the scoring job (`cxr run`), the producers and the CLI, with PySpark, TensorFlow, Java 17,
# the Spark Kafka connector and the demo model. One image serves the Spark driver and executors on Kubernetes
# (see k8s/image/entrypoint.sh) and any `cxr ...` command.
#
#   docker build -t ghcr.io/example/cxr-stream:0.1.0 .
#
# Three stages: Maven resolves the JVM jars, pip builds the project's wheel, and the runtime stage installs
# both, without build tools. Built for linux/amd64 (TensorFlow's CPU wheels).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- 1. JVM jars: Kafka broker (jvm/lib/kafka) and Spark's Kafka connector (jvm/lib/spark), from Maven Central
FROM debian:bookworm-slim AS jvm
# Must equal the PySpark pinned in pyproject.toml; the runtime stage checks that they agree.
ARG SPARK_VERSION=4.2.0
# (openjdk's post-install scripts expect the man directory that slim images leave out.)
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jdk-headless maven ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY jvm/ jvm/
RUN mvn -B -q -f jvm/pom.xml package -Dspark.version=${SPARK_VERSION} \
 && ls jvm/lib/spark/*.jar jvm/lib/kafka/*.jar

# ---- 2. The project as a wheel: the runtime gets a regular (not editable) install and no source tree
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# ---- 3. Runtime
FROM ${PYTHON_IMAGE}

# Spark images run as UID 185; platform policies (and the Spark Operator's examples) expect it.
ARG SPARK_UID=185

# Java 17 for Spark; tini as PID 1 (signals, zombie Python workers); procps for `ps` when debugging a pod.
# /opt/java is a JAVA_HOME that does not depend on the architecture's directory name under /usr/lib/jvm.
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini procps \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /opt/java \
 && groupadd --system --gid "${SPARK_UID}" spark \
 && useradd --system --uid "${SPARK_UID}" --gid spark --home-dir /opt/cxr/work --no-create-home \
      --shell /usr/sbin/nologin spark

# SPARK_HOME: PySpark from PyPI is a complete Spark client (bin/spark-submit, bin/spark-class, jars/) inside
#   the package, which pip puts here in this base image; the build checks it below.
# PYSPARK_*: the driver and the Python workers run this image's interpreter (its TensorFlow, its cxr-stream).
# CXR_JVM_LIB_DIR: the Maven-resolved jars (Settings.jvm_lib_dir); an installed package cannot find them
#   relative to its own files the way a source checkout does.
# Read-only root filesystem (k8s/ runs every container so): the only writable places are /tmp, HOME (the
#   working directory, where Spark executors fetch the job's files) and Spark's local dirs (SPARK_LOCAL_DIRS,
#   which Spark on Kubernetes mounts itself); the pods mount emptyDir volumes on the first two. Caches that
#   would go under HOME go to /tmp instead, so a pod that mounts only /tmp still works: Keras' config
#   (KERAS_HOME), XDG caches, matplotlib's (if a tool pulls it in). Python writes no bytecode.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JAVA_HOME=/opt/java \
    SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/usr/local/bin/python3 \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python3 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CXR_JVM_LIB_DIR=/opt/cxr/jvm/lib \
    HOME=/opt/cxr/work \
    TMPDIR=/tmp \
    KERAS_HOME=/tmp/.keras \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
ENV PATH="${SPARK_HOME}/bin:${PATH}"

# The project, then the demo model and sample X-rays: the model package's declared dependencies pin ancient
# versions, so it is installed without them (as `make install` does).
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install /tmp/wheels/*.whl \
 && pip install --no-deps pneumonia-model-package==0.3.0 \
 && rm -rf /tmp/wheels

COPY --from=jvm /build/jvm/lib/ /opt/cxr/jvm/lib/
COPY k8s/image/entrypoint.sh /opt/entrypoint.sh

# Fail the build, not the first pod, when the pieces disagree: SPARK_HOME is where pip put PySpark, the
# connector matches PySpark's version, and the default model bundle and sample images are where the settings
# look for them. Executors fetch the job's jars into their working directory, so it is writable by the UID.
RUN chmod 0755 /opt/entrypoint.sh \
 && python -c "import os, pyspark; from pathlib import Path; \
from streaming.spark import connector_jars; from streaming.settings import Settings; \
assert os.path.dirname(pyspark.__file__) == os.environ['SPARK_HOME'], pyspark.__file__; \
assert os.access(os.path.join(os.environ['SPARK_HOME'], 'bin', 'spark-submit'), os.X_OK); \
print(*connector_jars(Path(os.environ['CXR_JVM_LIB_DIR'])), sep=chr(10)); \
s = Settings(); assert (s.model_bundle / 'bundle.json').is_file(), s.model_bundle; \
assert s.allowed_roots and s.allowed_roots[0].is_dir(), s.allowed_roots" \
 && java -version \
 && mkdir -p /opt/cxr/work \
 && chown "${SPARK_UID}:${SPARK_UID}" /opt/cxr/work

WORKDIR /opt/cxr/work
USER ${SPARK_UID}
# 9108: metrics, /healthz and /readyz of `cxr run` (CXR_METRICS_PORT). 4040: Spark UI and its Prometheus servlet.
# 9109: the same of `cxr produce orthanc|dicomweb|scp` as k8s/ runs them (CXR_FEED_METRICS_PORT; off unless set).
# 9110: the same of `cxr export fhir|sr` as k8s/ runs them (CXR_EXPORT_METRICS_PORT; off unless set).
# 8080: `cxr worklist`. 11112: `cxr produce scp` (DICOM).
EXPOSE 9108 4040 9109 9110 8080 11112
ENTRYPOINT ["/opt/entrypoint.sh"]
CMD ["cxr", "--help"]
