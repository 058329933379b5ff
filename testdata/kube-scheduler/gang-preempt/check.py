"""Scenario `gang-preempt`: what kube-scheduler did for the priority-1000 gang of two 8-GPU pods.

Reads each variant's extcheck.out (arguments: the scenario's runs/ folder, then the variants that ran) and requires, per
variant: exactly two pods deleted as preemption victims, both low-priority 8-GPU fillers on two
distinct nodes (never a member of the bound gang `llama`, never the small singles when fillers
do), and both urgent pods nominated, to those two nodes. Exit 1 naming what differs.
"""
import os, re, sys

runs = sys.argv[1]
failures = []
# The variants that ran: those named after the folder (what .ci/kube-scheduler passes), else
# the scenario's own; each must have left its output.
expected = sys.argv[2:] or ["cache-bind-preempt", "nocache-bind-preempt"]
for variant in expected:
    path = os.path.join(runs, variant, "extcheck.out")
    if not os.path.exists(path):
        failures.append(f"{variant}: no output ({path})")
        continue
    text = open(path).read()
    # "  pod batch/filler-0           gang=       gpus=8 node= DELETED (preemption victim)"
    pods = re.findall(r"^  pod (\S+)\s+gang=(\S*)\s+gpus=(\S*) node=(\S*)(.*)$", text, re.M)
    deleted = [name for name, _, _, _, extra in pods if "DELETED" in extra]
    nominated = {name: m.group(1) for name, _, _, _, extra in pods if (m := re.search(r"nominatedNodeName=(\S+)", extra))}
    # Victims are named by the node they were bound to in the first exchanges' binds.
    bound_to = dict(re.findall(r"#\d+ bind (\S+) node=(\S+)", text))
    victim_nodes = sorted(bound_to.get(name, "?") for name in deleted)
    urgent = sorted(n for n in nominated if "/urgent-" in n)
    print(f"{variant}: deleted {deleted} on {victim_nodes}; nominated {nominated}")
    if len(deleted) != 2 or not all("/filler-" in d for d in deleted):
        failures.append(f"{variant}: deleted {deleted}, expected two fillers")
    if len(set(victim_nodes)) != 2:
        failures.append(f"{variant}: victims on {victim_nodes}, expected two distinct nodes")
    if urgent != ["serving/urgent-0", "serving/urgent-1"]:
        failures.append(f"{variant}: nominated {nominated}, expected both urgent pods")
    elif sorted(nominated[u] for u in urgent) != victim_nodes:
        failures.append(f"{variant}: urgent pods nominated to {nominated}, victims were on {victim_nodes}")
for failure in failures:
    print("FAIL:", failure)
sys.exit(1 if failures else 0)
