"""`wan-batch serve`: an HTTP service over the batch engine.

Requests (the seed service's /submit and LightX2V's /v1/tasks/video/) become rows of a durable SQLite queue;
one long-lived worker process (models resident) takes every waiting row, writes them as a Parquet manifest and
drains it through the same Luigi tasks as `wan-batch run`, so waiting jobs are grouped stage-major and share
the artifact store's cache.

  settings.py   limits and paths (CLI flags, seed-service environment variables)
  queue.py      the SQLite queue: submit, claim, finish exactly once, requeue after a crash
  inputs.py     request images: URL (timeout, size cap), base64, upload, or a path under allowed folders
  requests.py   request models of both APIs -> one normalised job
  progress.py   stage and progress of a job, read from the artifact store
  worker.py     the worker process: claim -> manifest -> run_batch -> mark done/failed
  supervisor.py starts the worker, restarts it, enforces TASK_TIMEOUT
  metrics.py    Prometheus text from the queue's tables
  app.py        the FastAPI app (seed-service routes, health, metrics, videos)
  lightx2v_compat.py  LightX2V's /v1/tasks routes
"""
