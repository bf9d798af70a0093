"""Scaled-out tinkerd: API processes and GPU worker processes meeting in Redis.

- `state`: the Redis keys, futures (results with an expiry, a pub/sub notice per settle), the
  registry's records, worker registrations.
- `scheduler`: the API side. Sequencing and de-duplication of (model_id, seq_id) in Redis, done
  atomically by Lua scripts so that any API process may take any request; placement of models on
  workers; Celery dispatch to the owning worker's queue; the reaper of lost workers.
- `celery_app`: the Celery app and its one task, which hands work to a worker's local scheduler.
- `worker`: `tinkerd worker`, the same `worker.Worker` loop as `tinkerd serve`, fed by Celery.
- `api`: `tinkerd serve --redis`, the Flask app under gunicorn.
"""
