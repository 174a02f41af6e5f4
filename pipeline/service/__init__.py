"""`wan-batch serve`: an HTTP service over the batch engine.

Requests (the seed service's /submit and LightX2V's /v1/tasks/video/) become rows of a durable SQLite queue;
one long-lived worker process (models resident) takes drains of waiting rows (the oldest, then the cheapest
that fit in --drain-steps denoise steps), writes each as a Parquet manifest and runs it through the same Luigi
tasks as `wan-batch run`, so jobs of a drain run stage-major and every drain shares the artifact store's cache.

  settings.py   limits and paths (CLI flags, seed-service environment variables)
  queue.py      the SQLite queue: submit, claim, finish exactly once, requeue after a crash
  inputs.py     request images: URL (one deadline, fetch cap, public addresses), base64, upload, or a path
                under allowed folders
  schemas.py    request models of both APIs -> one normalised job; save_result_path checks
  web.py        body limit, token and cross-origin guard, reading JSON/multipart submissions
  progress.py   stage and progress of a job, read from the artifact store
  worker.py     the worker process: claim a bounded drain -> manifest -> run_batch -> mark done/failed
  supervisor.py starts the worker, restarts it, enforces TASK_TIMEOUT
  metrics.py    Prometheus text from the queue's tables
  app.py        the FastAPI app (seed-service routes, health, metrics, videos)
  lightx2v_compat.py  LightX2V's /v1/tasks routes
"""
