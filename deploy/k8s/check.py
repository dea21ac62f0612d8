#!/usr/bin/env python3
"""Checks the Kubernetes base without a cluster (tests/deploy.rs runs it; so can you).

1. Every resource against the Kubernetes schemas (strict: unknown fields fail), with the
   `kubernetes-validate` package (scripts/setup.sh installs it; it bundles the schemas).
2. The references between them: selectors, the Service's target, Secret, ConfigMap and PVC
   names, the Indexed Job's size against the job file's world size, grace periods against the
   coordinator's stop timeout.
Exits non-zero naming the file, the resource and what disagrees.
"""
import pathlib
import sys
import tomllib

import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def main():
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    job = tomllib.loads((HERE / "job.toml").read_text())
    generated = {
        "Secret": {g["name"]: [f.split("=")[0] for f in g.get("files", [])] for g in kustomization.get("secretGenerator", [])},
        "ConfigMap": {g["name"]: [f.split("=")[0] for f in g.get("files", [])] for g in kustomization.get("configMapGenerator", [])},
    }
    common = {}
    for entry in kustomization.get("labels", []):
        common.update(entry.get("pairs", {}))
    resources = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((HERE / name).read_text()):
            where = f"deploy/k8s/{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            except kubernetes_validate.ValidationError as err:
                fail(where, f"schema: {err.message} at {'/'.join(map(str, err.path))}")
            except kubernetes_validate.SchemaNotFoundError as err:
                fail(where, f"no schema: {err}")
            resources[doc["kind"]] = (where, doc)
    missing = [k for k in ["Deployment", "Service", "PersistentVolumeClaim", "Job"] if k not in resources]
    if missing:
        fail("deploy/k8s/kustomization.yaml", f"no {', '.join(missing)} among the resources")
        return

    pvc_where, pvc = resources["PersistentVolumeClaim"]
    if "ReadWriteMany" not in pvc["spec"]["accessModes"]:
        fail(pvc_where, "every pod mounts the state volume: it needs ReadWriteMany")

    dep_where, dep = resources["Deployment"]
    pod_labels = {**dep["spec"]["template"]["metadata"].get("labels", {}), **common}
    for k, v in dep["spec"]["selector"]["matchLabels"].items():
        if pod_labels.get(k) != v:
            fail(dep_where, f"selector {k}={v} does not match the pod template's labels {pod_labels}")
    svc_where, svc = resources["Service"]
    for k, v in svc["spec"]["selector"].items():
        if pod_labels.get(k) != v:
            fail(svc_where, f"selector {k}={v} selects no coordinator pod (labels {pod_labels})")
    coordinator = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in coordinator.get("ports", [])}
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        if target not in ports and target not in ports.values():
            fail(svc_where, f"targetPort {target} is no port of the coordinator container {ports}")
    listen = coordinator["command"][coordinator["command"].index("--listen") + 1]
    if int(listen.rsplit(":", 1)[1]) not in ports.values():
        fail(dep_where, f"the coordinator listens on {listen}, not on a declared port {ports}")

    job_where, workers = resources["Job"]
    spec = workers["spec"]
    world = job["rendezvous"]["min_workers"]
    if spec.get("completionMode") != "Indexed":
        fail(job_where, "the workers must be an Indexed Job (completionMode: Indexed)")
    if not spec.get("parallelism") == spec.get("completions") == world:
        fail(job_where, f"parallelism {spec.get('parallelism')} and completions {spec.get('completions')} must equal "
             f"rendezvous.min_workers = {world} in job.toml")
    worker_pod = spec["template"]["spec"]
    worker = worker_pod["containers"][0]
    if "nvidia.com/gpu" not in worker.get("resources", {}).get("limits", {}):
        fail(job_where, "the worker asks for no nvidia.com/gpu")
    url = env_of(worker).get("MTL_COORDINATOR", {}).get("value", "")
    service_url = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    if url != service_url:
        fail(job_where, f"MTL_COORDINATOR = {url!r}, the Service is {service_url}")

    stop_ms = int(env_of(coordinator).get("MTL_SERVER__STOP_TIMEOUT_MS", {}).get("value", 20000))
    for where, pod in [(dep_where, dep["spec"]["template"]["spec"]), (job_where, worker_pod)]:
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace * 1000 <= stop_ms:
            fail(where, f"terminationGracePeriodSeconds {grace} must exceed server.stop_timeout_ms = {stop_ms}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    fail(where, f"volumeMount {m['name']} names no volume")
            envs = env_of(c)
            if "MTL_JOB_TOKEN" not in envs or "valueFrom" not in envs["MTL_JOB_TOKEN"]:
                fail(where, "MTL_JOB_TOKEN must come from the Secret (valueFrom.secretKeyRef), never a literal")
            for e in envs.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in generated["Secret"].get(ref["name"], []):
                    fail(where, f"env {e['name']} refers to Secret {ref['name']} key {ref['key']}, which the "
                         f"kustomization does not generate ({generated['Secret']})")
        for v in volumes.values():
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] != pvc["metadata"]["name"]:
                fail(where, f"volume {v['name']} claims {v['persistentVolumeClaim']['claimName']}, "
                     f"the claim is {pvc['metadata']['name']}")
            if "configMap" in v and v["configMap"]["name"] not in generated["ConfigMap"]:
                fail(where, f"volume {v['name']} names ConfigMap {v['configMap']['name']}, not generated here")


if __name__ == "__main__":
    main()
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"deploy/k8s: {len(yaml.safe_load((HERE / 'kustomization.yaml').read_text())['resources'])} resources valid "
          f"against the Kubernetes {kubernetes_validate.latest_version()} schemas; references agree")
