#!/usr/bin/env bash
# Entry point of the cxr-stream image.
#
# Spark on Kubernetes (spark-submit --master k8s://..., and so the Spark Operator) starts the driver and
# executor pods of this image with container args, not a command, and expects the image's entry point to
# understand two of them. The official Spark images do that with the distribution's
# kubernetes/dockerfiles/spark/entrypoint.sh; PySpark from PyPI does not ship it, so this is our own minimal
# equivalent of that contract:
#
#   driver ARGS...    spark-submit --deploy-mode client ARGS... inside the driver pod (the pod IS the cluster
#                     mode driver; a second cluster-mode submit would recurse). Spark passes
#                     --properties-file, --class org.apache.spark.deploy.PythonRunner, the main file and its
#                     arguments, and sets SPARK_DRIVER_BIND_ADDRESS to the pod IP.
#   executor          java ... org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend, configured
#                     entirely from the environment the driver sets on executor pods: SPARK_DRIVER_URL,
#                     SPARK_EXECUTOR_ID, SPARK_EXECUTOR_CORES, SPARK_EXECUTOR_MEMORY, SPARK_APPLICATION_ID,
#                     SPARK_EXECUTOR_POD_IP, SPARK_RESOURCE_PROFILE_ID, SPARK_EXECUTOR_POD_NAME, and the JVM
#                     options as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... (in that order).
#   drain             the driver pod's preStop hook: ask the Python driver (`cxr run`, under spark-submit or
#                     on its own) to stop, and wait until it has. It stops between micro-batches, so the batch
#                     in flight is committed before Kubernetes sends SIGTERM to the JVM, whose shutdown hooks
#                     would otherwise stop the session mid-batch. Waits up to DRAIN_TIMEOUT_S (default 75,
#                     inside the pod's terminationGracePeriodSeconds); never fails the hook.
#   anything else     run as given (e.g. `cxr run`, `cxr produce folder /data/images --watch`, `bash`).
#
# Everything runs under tini when it is installed, so signals reach the JVM / Python and zombies are reaped.
# The root filesystem may be read-only: nothing here writes outside /tmp, HOME and Spark's local dirs.
set -euo pipefail

# Hadoop's user lookup (used by Spark) fails for a UID without a passwd entry, which happens when a platform
# runs the image under an arbitrary UID (OpenShift). Name the user explicitly in that case.
if ! getent passwd "$(id -u)" >/dev/null 2>&1; then
  export HADOOP_USER_NAME="${HADOOP_USER_NAME:-${SPARK_USER:-spark}}"
  export USER="${USER:-$HADOOP_USER_NAME}"
fi

java_bin() {
  if [[ -n "${JAVA_HOME:-}" ]]; then
    echo "$JAVA_HOME/bin/java"
  else
    command -v java
  fi
}

# Classpath of a Kubernetes executor: Spark's configuration directory (the driver mounts spark.properties
# and friends there), PySpark's jars, and whatever the pod adds.
executor_classpath() {
  local cp="${SPARK_HOME}/jars/*"
  if [[ -n "${SPARK_CONF_DIR:-}" ]]; then
    cp="${SPARK_CONF_DIR}:${cp}"
  else
    cp="${SPARK_HOME}/conf:${cp}"
  fi
  [[ -n "${HADOOP_CONF_DIR:-}" ]] && cp="${HADOOP_CONF_DIR}:${cp}"
  [[ -n "${SPARK_EXTRA_CLASSPATH:-}" ]] && cp="${cp}:${SPARK_EXTRA_CLASSPATH}"
  [[ -n "${SPARK_DIST_CLASSPATH:-}" ]] && cp="${cp}:${SPARK_DIST_CLASSPATH}"
  echo "$cp"
}

# SPARK_JAVA_OPT_<n>, ordered by n; values are read by indirection, so '=' and spaces inside them survive.
executor_java_opts() {
  local name
  while read -r name; do
    [[ -n "$name" ]] && EXECUTOR_JAVA_OPTS+=("${!name}")
  done < <(compgen -e | grep -E '^SPARK_JAVA_OPT_[0-9]+$' | sort -t_ -k4,4n || true)
}

# The Python process running `cxr run`: `python3 .../streaming/cli.py run` (spark-submit's PythonRunner) or
# `python3 /usr/local/bin/cxr run`. Anchored on the interpreter, so the JVM whose arguments name the same file
# does not match.
driver_python_pid() {
  pgrep -o -f '^[^ ]*python[0-9.]* [^ ]*(streaming/cli\.py|bin/cxr) run( |$)' || true
}

drain() {
  local pid waited=0 timeout="${DRAIN_TIMEOUT_S:-75}"
  pid="$(driver_python_pid)"
  if [[ -z "$pid" ]]; then
    echo "drain: no cxr run process; nothing to do" >&2
    return 0
  fi
  echo "drain: asking cxr run (pid $pid) to stop after the micro-batch in flight" >&2
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if (( waited >= timeout )); then
      echo "drain: cxr run still running after ${timeout} s; leaving it to SIGTERM" >&2
      return 0
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "drain: cxr run stopped after ${waited} s" >&2
}

run() {
  if command -v tini >/dev/null 2>&1; then
    exec tini -s -- "$@"
  fi
  exec "$@"
}

case "${1:-}" in
  driver)
    shift
    : "${SPARK_HOME:?SPARK_HOME must point at the pyspark package directory}"
    run "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    : "${SPARK_HOME:?SPARK_HOME must point at the pyspark package directory}"
    : "${SPARK_DRIVER_URL:?the driver sets SPARK_DRIVER_URL on executor pods}"
    : "${SPARK_EXECUTOR_ID:?the driver sets SPARK_EXECUTOR_ID on executor pods}"
    : "${SPARK_EXECUTOR_CORES:?the driver sets SPARK_EXECUTOR_CORES on executor pods}"
    : "${SPARK_EXECUTOR_MEMORY:?the driver sets SPARK_EXECUTOR_MEMORY on executor pods}"
    : "${SPARK_APPLICATION_ID:?the driver sets SPARK_APPLICATION_ID on executor pods}"
    : "${SPARK_EXECUTOR_POD_IP:?the driver sets SPARK_EXECUTOR_POD_IP on executor pods}"
    EXECUTOR_JAVA_OPTS=()
    executor_java_opts
    run "$(java_bin)" \
      "${EXECUTOR_JAVA_OPTS[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY}" \
      "-Xmx${SPARK_EXECUTOR_MEMORY}" \
      -cp "$(executor_classpath)" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" \
      --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
      --podName "${SPARK_EXECUTOR_POD_NAME:-$(hostname)}"
    ;;
  drain)
    drain
    ;;
  "")
    run cxr --help
    ;;
  *)
    run "$@"
    ;;
esac
