"""`merv-fast plan`: a memory and step-time model of MERV training for any preset on any cluster.

hardware.py  the device and interconnect tables, the cluster, measured ceilings overriding the tables
shapes.py    the model's FSDP2 units and activation sizes, read off a meta-device build
workload.py  the precision regime and one rank's step shape
memory.py    memory per GPU, itemised, as a timeline of the moments that can set the peak
timing.py    time per step, itemised by phase, communication and its overlap
planner.py   the plan, the search over settings, the recommendation, the printed table
scaling.py   the README's scaling table
"""
