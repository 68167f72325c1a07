"""What a small team writes instead of cxr-stream: one kafka-python consumer process doing the same scoring.

Poll up to 32 references, fetch and decode each (cxr-stream's own `prepare`, so the pixels are identical),
predict them as one batch through the same compiled model, produce the results, flush, commit. TensorFlow
uses every core. Prints `ready` once it consumes, then runs until SIGTERM.

    python -m bench.consumer_peer BUNDLE_DIR   (Kafka and topics from the CXR_* environment)
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from streaming.bundle import load
from streaming.contracts import dumps, now_utc, parse_reference
from streaming.errors import CxrError
from streaming.scoring import prepare, result_body, scoring_config
from streaming.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    settings = Settings.load()
    bundle = load(args.bundle)
    bundle.warm_up(args.batch)
    config = scoring_config(settings)
    descriptor = bundle.descriptor

    consumer = KafkaConsumer(
        settings.input_topic,
        group_id="bench-consumer-peer",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=args.batch,
        fetch_max_wait_ms=20,
        **settings.kafka_python_config(KafkaConsumer.DEFAULT_CONFIG),
    )
    producer = KafkaProducer(linger_ms=5, **settings.kafka_python_config(KafkaProducer.DEFAULT_CONFIG))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while not stopping:
        records = [r for batch in consumer.poll(timeout_ms=100).values() for r in batch]
        if not records:
            continue
        refs, inputs = [], []
        for record in records:
            try:
                ref = parse_reference(record.value)
                inputs.append(prepare(ref, descriptor, config))
                refs.append(ref)
            except CxrError as exc:
                producer.send(settings.dead_letter_topic, value=dumps({"error": exc.code.value}).encode())
        if refs:
            probabilities = bundle.predict(np.stack(inputs), args.batch)
            scored_at = now_utc()
            for ref, probs in zip(refs, probabilities, strict=True):
                body = result_body(ref, probs, descriptor, scored_at)
                producer.send(settings.results_topic, key=ref.key.encode(), value=dumps(body).encode())
        producer.flush()
        consumer.commit()
    consumer.close()
    producer.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
