"""Toy 2D tasks with exact targets: the tasks and their references, the staged pipeline that
trains and evaluates every method on them, and the report."""
