"""cxr-stream's scoring job: Kafka references in, triaged results and dead letters out."""

__version__ = "0.1.0"
