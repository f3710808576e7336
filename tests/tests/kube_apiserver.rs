//! The real Kubernetes API server harness (tests/src/kube.rs) on its own: etcd plus
//! kube-apiserver 1.20 start, store the objects the proxy watches (Services, Pods,
//! EndpointSlices, ServiceAccounts), serve them back, and keep them across an API server
//! restart. A failure here points at the harness, not at the proxy.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::kube::{ApiServer, require_apiserver};

const NS: &str = "mesh-test";
const POD_IP: &str = "10.77.1.2";
const CLUSTER_IP: &str = "10.96.0.50";

fn objects_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: backend
  namespace: {NS}
---
apiVersion: v1
kind: Service
metadata:
  name: backend
  namespace: {NS}
spec:
  clusterIP: {CLUSTER_IP}
  selector:
    app: backend
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
---
apiVersion: v1
kind: Pod
metadata:
  name: backend-0
  namespace: {NS}
  labels:
    app: backend
spec:
  nodeName: node-1
  serviceAccountName: backend
  automountServiceAccountToken: false
  containers:
  - name: app
    image: example.invalid/backend:1
    ports:
    - containerPort: 8080
"#
    )
}

fn endpoint_slice_yaml(version: &str, pod_uid: &str) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/{version}
kind: EndpointSlice
metadata:
  name: backend-abc12
  namespace: {NS}
  labels:
    kubernetes.io/service-name: backend
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["{POD_IP}"]
  conditions:
    ready: true
  topology:
    kubernetes.io/hostname: node-1
  targetRef:
    kind: Pod
    namespace: {NS}
    name: backend-0
    uid: {pod_uid}
"#
    )
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Lists everything back with kubectl and checks the fields the proxy relies on.
fn check_objects(api: &ApiServer, slice_version: &str) -> Result<()> {
    let svc = api.kubectl_json(&["get", "service", "backend", "-n", NS])?;
    ensure!(
        str_at(&svc, "/spec/clusterIP") == CLUSTER_IP,
        "service: {svc}"
    );
    ensure!(
        svc.pointer("/spec/ports/0/port").and_then(Value::as_u64) == Some(80)
            && svc
                .pointer("/spec/ports/0/targetPort")
                .and_then(Value::as_u64)
                == Some(8080),
        "service ports: {svc}"
    );

    let pods = api.kubectl_json(&["get", "pods", "-n", NS])?;
    let items = pods["items"].as_array().context("pods list")?;
    ensure!(items.len() == 1, "one pod expected: {pods}");
    let pod = &items[0];
    ensure!(str_at(pod, "/metadata/name") == "backend-0", "pod: {pod}");
    ensure!(
        str_at(pod, "/spec/nodeName") == "node-1",
        "pod nodeName: {pod}"
    );
    ensure!(
        str_at(pod, "/spec/serviceAccountName") == "backend",
        "pod serviceAccountName: {pod}"
    );
    ensure!(
        str_at(pod, "/status/phase") == "Running",
        "pod phase: {pod}"
    );
    ensure!(str_at(pod, "/status/podIP") == POD_IP, "pod IP: {pod}");
    ensure!(
        str_at(pod, "/status/podIPs/0/ip") == POD_IP,
        "pod IPs: {pod}"
    );
    let ready = pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    ensure!(ready, "pod Ready condition: {pod}");

    let sas = api.kubectl_json(&["get", "serviceaccounts", "-n", NS])?;
    let mut names: Vec<&str> = sas["items"]
        .as_array()
        .context("serviceaccounts list")?
        .iter()
        .map(|s| str_at(s, "/metadata/name"))
        .collect();
    names.sort_unstable();
    ensure!(
        names == ["backend", "default"],
        "service accounts: {names:?}"
    );

    let resource = format!("endpointslices.{slice_version}.discovery.k8s.io");
    let slices = api.kubectl_json(&[
        "get",
        &resource,
        "-n",
        NS,
        "-l",
        "kubernetes.io/service-name=backend",
    ])?;
    let items = slices["items"].as_array().context("endpointslices list")?;
    ensure!(items.len() == 1, "one EndpointSlice expected: {slices}");
    let slice = &items[0];
    ensure!(
        str_at(slice, "/apiVersion") == format!("discovery.k8s.io/{slice_version}"),
        "slice apiVersion: {slice}"
    );
    ensure!(str_at(slice, "/addressType") == "IPv4", "slice: {slice}");
    ensure!(
        str_at(slice, "/endpoints/0/addresses/0") == POD_IP,
        "slice address: {slice}"
    );
    ensure!(
        slice.pointer("/endpoints/0/conditions/ready") == Some(&Value::Bool(true)),
        "slice ready: {slice}"
    );
    ensure!(
        str_at(slice, "/endpoints/0/topology/kubernetes.io~1hostname") == "node-1",
        "slice topology: {slice}"
    );
    ensure!(
        str_at(slice, "/endpoints/0/targetRef/name") == "backend-0",
        "slice targetRef: {slice}"
    );
    ensure!(
        slice.pointer("/ports/0/port").and_then(Value::as_u64) == Some(8080),
        "slice port: {slice}"
    );
    Ok(())
}

#[test]
fn api_server_starts_serves_core_objects_and_restarts() -> Result<()> {
    if !require_apiserver()? {
        return Ok(());
    }
    let mut api = ApiServer::start()?;

    // 1.20 serves EndpointSlices only as v1beta1: a client has to discover the version.
    let slice_version = api.endpoint_slice_version()?;
    ensure!(
        slice_version == "v1beta1",
        "kube-apiserver 1.20 prefers discovery.k8s.io/v1beta1, got {slice_version}"
    );
    let (code, _) = api.api_get("/apis/discovery.k8s.io/v1")?;
    ensure!(
        code == 404,
        "discovery.k8s.io/v1 on 1.20: HTTP {code}, 404 expected"
    );

    // The API server keeps its own Service (the first address of the service range).
    let kubernetes = api.kubectl_json(&["get", "service", "kubernetes", "-n", "default"])?;
    ensure!(
        str_at(&kubernetes, "/spec/clusterIP") == "10.96.0.1",
        "default/kubernetes: {kubernetes}"
    );

    api.create_namespace(NS)?;
    api.apply(&objects_yaml())?;
    // No scheduler or kubelet: the pod stays Pending until the test sets its status.
    let pending = api.kubectl(&[
        "get",
        "pod",
        "backend-0",
        "-n",
        NS,
        "-o",
        "jsonpath={.status.phase}",
    ])?;
    ensure!(pending == "Pending", "new pod phase: {pending:?}");
    api.set_pod_running(NS, "backend-0", POD_IP)?;

    let uid = api.kubectl(&[
        "get",
        "pod",
        "backend-0",
        "-n",
        NS,
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    ensure!(!uid.is_empty(), "pod has no uid");
    api.apply(&endpoint_slice_yaml(&slice_version, &uid))?;

    check_objects(&api, &slice_version)?;

    // An API outage: kube-apiserver stops, etcd keeps the objects.
    api.stop_apiserver();
    ensure!(
        api.kubectl(&["get", "pods", "-n", NS]).is_err(),
        "kubectl worked with the API server stopped"
    );
    ensure!(
        api.api_get("/readyz").is_err(),
        "/readyz answered while stopped"
    );
    api.restart_apiserver()?;
    check_objects(&api, &slice_version)?;

    // Still writable after the restart.
    api.kubectl(&["label", "service", "backend", "-n", NS, "restarted=yes"])?;
    let label = api.kubectl(&[
        "get",
        "service",
        "backend",
        "-n",
        NS,
        "-o",
        "jsonpath={.metadata.labels.restarted}",
    ])?;
    ensure!(label == "yes", "label after restart: {label:?}");
    Ok(())
}
