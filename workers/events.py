"""Names of the progress events a job reports that whoever runs it acts on (torch-free:
the dispatcher imports them without the engine)."""

TRAINER_STARTED = "trainer_started"  # a Ray Train run is up; payload names its placement group
RESUMED = "resumed"  # a Ray Train run resumed from a checkpoint; payload: from_step
