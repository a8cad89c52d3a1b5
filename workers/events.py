"""Names of the progress events a job reports that whoever runs it acts on (torch-free:
the dispatcher imports them without the engine)."""

TRAINER_STARTED = "trainer_started"  # a Ray Train run is up; payload names its placement group
RESUMED = "resumed"  # a Ray Train run resumed from a checkpoint; payload: from_step
RANK_STARTED = "rank_started"  # payload {rank, pid}: from every rank once it runs
RANK_STOPPED = "rank_stopped"  # payload {rank, step}: from every rank when cancelled
