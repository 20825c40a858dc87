"""A faithful, fast, fault-injecting simulator of the Qoder Cloud Agents API (read side).

    from bridge.simulator import Scenario, SessionSpec, ThreadSpec, Faults, running_simulator

    async with running_simulator("tiny", token="pt-test") as sim:
        sim.base_url          # http://127.0.0.1:PORT/api/v1/cloud
        sim.thread_log(session_id, thread_id)   # canonical bytes the bridge must deliver

``serve(host, port, scenario, token)`` serves until SIGINT/SIGTERM (``qoder-bridge simulate``).
"""

from bridge.simulator.app import Connection
from bridge.simulator.named import NAMED, load_scenario
from bridge.simulator.scenario import Faults, Scenario, SessionSpec, ThreadSpec
from bridge.simulator.server import Simulator, running_simulator, serve

__all__ = [
    "NAMED",
    "Connection",
    "Faults",
    "Scenario",
    "SessionSpec",
    "Simulator",
    "ThreadSpec",
    "load_scenario",
    "running_simulator",
    "serve",
]
