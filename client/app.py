"""The Flower ClientApp: unpack the round's message, run the client pipeline, reply.

A client with a device (a fleet slot in simulation, `--device-profile` on a real device)
runs the edgecore pipeline for it (client.edge_round); with `pipeline = "plain"`, or with no
device known, it tunes the dense model at full depth (client.pipeline).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.edge_round import Assignment, Device, edge_evaluate, edge_round
from client.plain_round import ClientData, local_round
from federation.records import from_record, to_metrics, to_record
from edgecore import wire
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from edgecore.profiles import resolve_profile

app = ClientApp()


def client_data(node_config: dict, experiment: Experiment) -> ClientData:
    """Simulation fills partition-id/num-partitions; a real device also names its data."""
    try:
        return ClientData(
            spec=str(node_config.get("data", experiment.data)),
            partition_id=int(node_config.get("partition-id", 0)),
            num_partitions=int(node_config.get("num-partitions", 1)),
            scheme=str(node_config.get("partition", experiment.partition)),
        )
    except (TypeError, ValueError) as err:
        raise EdgecoreError(f"node config {dict(node_config)} is malformed: {err}") from None


def client_device(node_config: dict, experiment: Experiment, client: ClientData) -> Device | None:
    """The device this client runs on: --device-profile (real device), else its fleet slot (simulation),
    else this machine's detected profile; None for the plain pipeline."""
    if experiment.pipeline == "plain":
        return None
    rank = int(node_config["lora-rank"]) if node_config.get("lora-rank") else None
    if "device-profile" in node_config:
        model = str(node_config["model"]) if node_config.get("model") else None
        return Device(resolve_profile(str(node_config["device-profile"])), rank, model)
    fleet = experiment.load_fleet()
    if fleet is None:
        return Device(resolve_profile("local"), rank)
    slot = fleet.client(client.partition_id)
    return Device(slot.device, slot.lora_rank)


def assignment(config: ConfigRecord) -> Assignment:
    weights = config.get("exit-weights")
    exit_layer = config.get("assigned-exit", -1)
    return Assignment(tuple(weights) if weights else None, int(exit_layer) if exit_layer >= 0 else None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    experiment = Experiment.from_mapping(context.run_config)
    client = client_data(context.node_config, experiment)
    device = client_device(context.node_config, experiment, client)
    global_arrays = from_record(msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    if device is None:
        lora, _exits = wire.split_exits(global_arrays)
        arrays, metrics = local_round(experiment, client, lora, server_round)
        info = {"device": "dense (plain)"}
    else:
        arrays, metrics = edge_round(experiment, client, device, global_arrays, server_round, assignment(msg.content["config"]))
        info = {"device": device.profile.name}
    content = RecordDict({"arrays": to_record(arrays), "metrics": to_metrics(metrics), "device": ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    experiment = Experiment.from_mapping(context.run_config)
    client = client_data(context.node_config, experiment)
    device = client_device(context.node_config, experiment, client)
    if device is None:
        raise EdgecoreError("client-side evaluation runs on a device's own base; this client has no device profile")
    metrics = edge_evaluate(experiment, client, device, from_record(msg.content["arrays"]))
    content = RecordDict({"metrics": to_metrics(metrics), "device": ConfigRecord({"device": device.profile.name})})
    return Message(content=content, reply_to=msg)
