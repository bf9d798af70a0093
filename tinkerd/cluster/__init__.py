"""Scaled-out tinkerd: API processes and GPU worker processes meeting in Redis.

- `keys`: the name of every Redis key.
- `state`: futures (results with an expiry, a pub/sub notice per settle), the registry's records,
  worker registrations, and what a worker writes to a model's sequence (skips, a rebuild).
- `scheduler`: the API side. Sequencing and de-duplication of (model_id, seq_id) in Redis, done
  atomically by Lua scripts (the rules of `tinkerd.sequencing`) so that any API process may take
  any request; placement of models on workers; Celery dispatch to the owning worker's queue.
- `reaper`: fails what a lost worker held and reports its models lost.
- `celery_app`: the Celery app and its one task, which hands work to a worker's local scheduler.
- `worker`: `tinkerd worker`, the same `worker.Worker` loop as `tinkerd serve`, fed by Celery.
- `api`: `tinkerd serve --redis`, the Flask app under gunicorn.
"""
