"""Wiring: Definitions, resources, storage, jobs, schedules, sensors and the ``autocoa`` CLI."""
