"""The client side of `tinkerd`: create, list, sample, save, delete, checkpoints, status,
loss-functions and export, each talking to a server over HTTP (`--url`, else $TINKERD_URL).

The official SDK does what it covers (creating runs, sampling, listing and deleting checkpoints);
plain REST does the rest: a run's status and worker (the SDK's TrainingRun drops them), saving a
run from a process that does not track its seq_ids, health, the loss registry, and checkpoint
archives. Nothing here loads a model except `export --merge`; the SDK is imported only by the
commands that use it.

`commands` parses the arguments and runs a command; `server` is the connection (REST and SDK
clients, ClientError); `runs`, `sampling` and `export` implement the commands.
"""
