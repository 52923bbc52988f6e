"""The Flower ClientApp: read the server's instruction, run the client's round, reply.

Messages are federation.protocol's: a TrainInstruction in, a TrainReply out (and the same for
evaluation). A client with a device (a fleet slot in simulation, `--device-profile` on a real
device) runs the edgecore pipeline for it (client.edge_round); with `pipeline = "plain"` it
tunes the dense model at full depth (client.plain_round).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.edge_round import Device, edge_evaluate, edge_round
from client.plain_round import ClientData, local_round
from edgecore import wire
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from edgecore.profiles import resolve_profile
from federation import protocol
from federation.protocol import EvaluateInstruction, TrainInstruction

app = ClientApp()


def client_data(node_config: dict, experiment: Experiment) -> ClientData:
    """Simulation fills partition-id/num-partitions; a real device also names its data."""
    try:
        return ClientData(
            spec=str(node_config.get(protocol.NODE_DATA, experiment.data)),
            partition_id=int(node_config.get(protocol.NODE_PARTITION_ID, 0)),
            num_partitions=int(node_config.get(protocol.NODE_NUM_PARTITIONS, 1)),
            scheme=str(node_config.get(protocol.NODE_PARTITION, experiment.partition)),
        )
    except (TypeError, ValueError) as err:
        raise EdgecoreError(f"node config {dict(node_config)} is malformed: {err}") from None


def client_device(node_config: dict, experiment: Experiment, client: ClientData) -> Device | None:
    """The device this client runs on: --device-profile (real device), else its fleet slot (simulation),
    else this machine's detected profile; None for the plain pipeline."""
    if experiment.pipeline == "plain":
        return None
    rank = int(node_config[protocol.NODE_LORA_RANK]) if node_config.get(protocol.NODE_LORA_RANK) else None
    if protocol.NODE_DEVICE_PROFILE in node_config:
        model = str(node_config[protocol.NODE_MODEL]) if node_config.get(protocol.NODE_MODEL) else None
        return Device(resolve_profile(str(node_config[protocol.NODE_DEVICE_PROFILE])), rank, model)
    fleet = experiment.load_fleet()
    if fleet is None:
        return Device(resolve_profile("local"), rank)
    slot = fleet.client(client.partition_id)
    return Device(slot.device, slot.lora_rank)


@app.train()
def train(msg: Message, context: Context) -> Message:
    experiment = Experiment.from_mapping(context.run_config)
    client = client_data(context.node_config, experiment)
    device = client_device(context.node_config, experiment, client)
    instruction = TrainInstruction.from_message(msg)
    if device is None:
        lora, _exits = wire.split_exits(instruction.arrays)
        reply = local_round(experiment, client, lora, instruction.server_round, dp=instruction.dp)
    else:
        reply = edge_round(experiment, client, device, instruction)
    return Message(content=reply.to_records(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    experiment = Experiment.from_mapping(context.run_config)
    client = client_data(context.node_config, experiment)
    device = client_device(context.node_config, experiment, client)
    if device is None:
        raise EdgecoreError("client-side evaluation runs on a device's own base; this client has no device profile")
    reply = edge_evaluate(experiment, client, device, EvaluateInstruction.from_message(msg).arrays)
    return Message(content=reply.to_records(), reply_to=msg)
