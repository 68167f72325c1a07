"""The triage worklist: consumes results and dead letters, keeps them durable, and serves the reading queue.

`events` turns Kafka messages into records, `ordering` decides who is read next (a pure function, also used by
the simulator), `store` keeps studies in SQLite with the Kafka offsets, `consumer` feeds the store, `api` and
`static/` serve the queue, and `simulate` compares orderings over a day of arrivals.
"""
