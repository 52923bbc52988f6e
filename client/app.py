"""The Flower ClientApp: unpack the round's message, run the client pipeline, reply."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.pipeline import ClientData, local_round
from client.records import from_record, to_metrics, to_record
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    experiment = Experiment.from_mapping(context.run_config)
    client = client_data(context.node_config, experiment)
    arrays, metrics = local_round(
        experiment, client, from_record(msg.content["arrays"]), int(msg.content["config"]["server-round"])
    )
    content = RecordDict({"arrays": to_record(arrays), "metrics": to_metrics(metrics)})
    return Message(content=content, reply_to=msg)
