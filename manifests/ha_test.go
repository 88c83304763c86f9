package manifests_test

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"sigs.k8s.io/yaml"

	"github.com/tsrelay/tsrelay/internal/kubetest"
)

// The HA examples: the base with components/ha, and with components/derp
// and components/ha-derp too.
const (
	haExample     = "../examples/ha"
	haDERPExample = "../examples/ha-derp"
)

// componentLabel marks the per-relay Services (relay) that components/ha
// copies the base Service's type and ports into, and components/derp
// patches.
const componentLabel = "app.kubernetes.io/component"

// meshSecret is the DERP mesh Secret components/ha-derp names.
const meshSecret = "tsrelay-derp-mesh"

// haObjects are the typed objects of an HA rendering that the checks look
// at.
type haObjects struct {
	sts      *appsv1.StatefulSet
	services map[string]*corev1.Service
	role     *rbacv1.Role
	pdbs     []*policyv1.PodDisruptionBudget
	kinds    []string // kind/name of every object
}

// parseHA converts the rendered objects it knows to typed ones, failing on
// any field the type does not have.
func parseHA(t *testing.T, objs []*unstructured.Unstructured) *haObjects {
	t.Helper()
	h := &haObjects{services: map[string]*corev1.Service{}}
	conv := func(o *unstructured.Unstructured, into any) {
		t.Helper()
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, into, true); err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	for _, o := range objs {
		h.kinds = append(h.kinds, o.GetKind()+"/"+o.GetName())
		switch o.GetKind() {
		case "StatefulSet":
			if h.sts != nil {
				t.Fatalf("two StatefulSets: %s and %s", h.sts.Name, o.GetName())
			}
			h.sts = &appsv1.StatefulSet{}
			conv(o, h.sts)
		case "Service":
			s := &corev1.Service{}
			conv(o, s)
			h.services[s.Name] = s
		case "Role":
			if h.role != nil {
				t.Fatalf("two Roles: %s and %s", h.role.Name, o.GetName())
			}
			h.role = &rbacv1.Role{}
			conv(o, h.role)
		case "PodDisruptionBudget":
			p := &policyv1.PodDisruptionBudget{}
			conv(o, p)
			h.pdbs = append(h.pdbs, p)
		}
	}
	if h.sts == nil || h.role == nil {
		t.Fatalf("rendered objects lack the StatefulSet or the Role: %v", h.kinds)
	}
	return h
}

// relayContainer returns the StatefulSet's one container.
func (h *haObjects) relayContainer(t *testing.T) *corev1.Container {
	t.Helper()
	cs := h.sts.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("StatefulSet %s: %d containers, want 1", h.sts.Name, len(cs))
	}
	return &cs[0]
}

// varRef is a $(NAME) reference in an env value, as Kubernetes expands them.
var varRef = regexp.MustCompile(`\$\(([-._a-zA-Z0-9]+)\)`)

// expandEnv returns the values the kubelet gives the container's env in pod
// podName: a downward-API metadata.name is the pod's name, and $(NAME) in a
// value is replaced by the value of a variable listed earlier in env only
// (kubelet's makeEnvironmentVariables; envFrom is left out: the manifests
// must not depend on it). An unknown reference stays as written, as it
// does in Kubernetes. $$ escapes are not used by the manifests and are not
// handled.
func expandEnv(env []corev1.EnvVar, podName string) map[string]string {
	got := map[string]string{}
	for _, e := range env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.name":
			got[e.Name] = podName
		case e.ValueFrom != nil:
			got[e.Name] = "<" + e.Name + " from the downward API>"
		default:
			got[e.Name] = varRef.ReplaceAllStringFunc(e.Value, func(ref string) string {
				if v, ok := got[varRef.FindStringSubmatch(ref)[1]]; ok {
					return v
				}
				return ref
			})
		}
	}
	return got
}

// replicaNameErrors checks that the four places naming the replicas agree,
// as "Changing the number of relays" in components/ha says they must: for
// each of the StatefulSet's replicas, its state Secret and Lease
// (TS_KUBE_SECRET, expanded) are in the Role by name, its Service
// (TS_RELAY_SERVICE) exists, selects exactly that pod and is in the Role,
// its tailnet hostname is its own; the Role names nothing else; and
// TS_DERP_MESH_PEERS, when set, names exactly those Services.
func replicaNameErrors(h *haObjects) []string {
	var errs []string
	bad := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	if h.sts.Spec.Replicas == nil {
		return []string{"StatefulSet replicas unset"}
	}
	n := int(*h.sts.Spec.Replicas)
	env := h.sts.Spec.Template.Spec.Containers[0].Env

	var secrets, services, hostnames []string
	var peers []string // as TS_DERP_MESH_PEERS of every replica
	mesh := ""
	for i := range n {
		pod := h.sts.Name + "-" + strconv.Itoa(i)
		vals := expandEnv(env, pod)
		secrets = append(secrets, vals["TS_KUBE_SECRET"])
		services = append(services, vals["TS_RELAY_SERVICE"])
		if slices.Contains(hostnames, vals["TS_HOSTNAME"]) {
			bad("pod %s: TS_HOSTNAME=%s, the same as another replica's", pod, vals["TS_HOSTNAME"])
		}
		hostnames = append(hostnames, vals["TS_HOSTNAME"])
		svc := h.services[vals["TS_RELAY_SERVICE"]]
		switch {
		case svc == nil:
			bad("pod %s: TS_RELAY_SERVICE=%s, but there is no such Service", pod, vals["TS_RELAY_SERVICE"])
		case svc.Spec.Selector[appsv1.StatefulSetPodNameLabel] != pod:
			bad("Service %s selects %s=%q, want the pod that follows it, %s", svc.Name, appsv1.StatefulSetPodNameLabel, svc.Spec.Selector[appsv1.StatefulSetPodNameLabel], pod)
		case svc.Labels[componentLabel] != "relay":
			bad("Service %s lacks the label %s: relay, by which components/ha gives it the base Service's type and ports", svc.Name, componentLabel)
		}
		if p, ok := vals["TS_DERP_MESH_PEERS"]; ok {
			if i > 0 && p != strings.Join(peers, ",") {
				bad("pod %s: TS_DERP_MESH_PEERS=%s differs from another replica's", pod, p)
			}
			peers = strings.Split(p, ",")
		}
		mesh = vals["TS_DERP_MESH_SECRET"]
	}
	// Every per-relay Service belongs to a replica.
	for name, svc := range h.services {
		if _, ok := svc.Spec.Selector[appsv1.StatefulSetPodNameLabel]; ok && !slices.Contains(services, name) {
			bad("Service %s selects a single pod, but no replica of %d follows it", name, n)
		}
	}
	if peers != nil && !sameSet(peers, services) {
		bad("TS_DERP_MESH_PEERS=%s, want the %d replicas' Services %s", strings.Join(peers, ","), n, strings.Join(services, ","))
	}

	wantSecrets := slices.Clone(secrets)
	if mesh != "" {
		wantSecrets = append(wantSecrets, mesh)
	}
	if got := roleNames(h.role, "", "secrets", "get"); !sameSet(got, wantSecrets) {
		bad("Role %s: get on Secrets %v, want %v", h.role.Name, got, wantSecrets)
	}
	if got := roleNames(h.role, "", "secrets", "update"); !sameSet(got, wantSecrets) {
		bad("Role %s: update on Secrets %v, want %v", h.role.Name, got, wantSecrets)
	}
	if got := roleNames(h.role, "", "secrets", "watch"); !sameSet(got, secrets) {
		bad("Role %s: watch on Secrets %v, want the replicas' %v (each re-creates its Secret if deleted)", h.role.Name, got, secrets)
	}
	for _, verb := range []string{"get", "update"} {
		if got := roleNames(h.role, "coordination.k8s.io", "leases", verb); !sameSet(got, secrets) {
			bad("Role %s: %s on Leases %v, want the replicas' %v", h.role.Name, verb, got, secrets)
		}
	}
	for _, verb := range []string{"get", "list", "watch"} {
		if got := roleNames(h.role, "", "services", verb); !sameSet(got, services) {
			bad("Role %s: %s on Services %v, want the replicas' %v", h.role.Name, verb, got, services)
		}
	}
	return errs
}

// roleNames returns the resourceNames of role's rules that grant verb on
// resource in group; "*" if a rule grants it without names.
func roleNames(role *rbacv1.Role, group, resource, verb string) []string {
	var names []string
	for _, r := range role.Rules {
		if !slices.Contains(r.APIGroups, group) || !slices.Contains(r.Resources, resource) || !slices.Contains(r.Verbs, verb) {
			continue
		}
		if len(r.ResourceNames) == 0 {
			names = append(names, "*")
		}
		names = append(names, r.ResourceNames...)
	}
	return names
}

func sameSet(a, b []string) bool {
	a, b = slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b))
	return slices.Equal(slices.Compact(a), slices.Compact(b)) && len(a) == len(b)
}

// TestHAComponent renders examples/ha and examples/ha-derp and checks what
// the API server does not: the Deployment and its Service are gone; the
// StatefulSet rolls one pod at a time, gated by readiness; each replica's
// names come from its pod name through $(POD_NAME), defined earlier in env;
// the replica count, per-relay Services, Role names and mesh peers agree;
// each Service selects exactly its pod with the base Service's settings;
// the replicas spread across nodes; the PodDisruptionBudget covers them.
func TestHAComponent(t *testing.T) {
	for _, tc := range []struct {
		dir  string
		derp bool
	}{
		{haExample, false},
		{haDERPExample, true},
	} {
		t.Run(filepath.Base(tc.dir), func(t *testing.T) {
			h := parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", tc.dir))
			for _, gone := range []string{"Deployment/tsrelay", "Service/tsrelay"} {
				if slices.Contains(h.kinds, gone) {
					t.Errorf("%s is still rendered; the StatefulSet and per-relay Services replace it", gone)
				}
			}

			sts := h.sts
			if r := sts.Spec.Replicas; r == nil || *r != 2 {
				t.Errorf("StatefulSet replicas = %v, want 2", r)
			}
			if p := sts.Spec.PodManagementPolicy; p != appsv1.ParallelPodManagement {
				t.Errorf("podManagementPolicy %q, want Parallel: a replica must be recreated while another is down", p)
			}
			us := sts.Spec.UpdateStrategy
			if us.Type != appsv1.RollingUpdateStatefulSetStrategyType {
				t.Errorf("updateStrategy %q, want RollingUpdate", us.Type)
			}
			if ru := us.RollingUpdate; ru != nil && ru.MaxUnavailable != nil && ru.MaxUnavailable.String() != "1" {
				t.Errorf("rollingUpdate.maxUnavailable %s, want 1: one relay at a time", ru.MaxUnavailable)
			}
			if sts.Spec.MinReadySeconds < 30 {
				t.Errorf("minReadySeconds %d, want at least 30 (the peers' relay-discovery interval)", sts.Spec.MinReadySeconds)
			}
			if hl := h.services[sts.Spec.ServiceName]; hl == nil || hl.Spec.ClusterIP != corev1.ClusterIPNone {
				t.Errorf("serviceName %q is not a headless Service of the rendering", sts.Spec.ServiceName)
			}
			podLabels := sts.Spec.Template.Labels
			if !subset(sts.Spec.Selector.MatchLabels, podLabels) {
				t.Errorf("StatefulSet selector %v does not match its pod labels %v", sts.Spec.Selector.MatchLabels, podLabels)
			}

			c := h.relayContainer(t)
			checkEnvOrder(t, c.Env)
			if got, want := envValues(c.Env), map[string]string{
				"TS_HOSTNAME":      "$(POD_NAME)",
				"TS_KUBE_SECRET":   "$(POD_NAME)-state",
				"TS_RELAY_SERVICE": "$(POD_NAME)",
			}; !submap(want, got) {
				t.Errorf("per-replica env %v, want %v", pick(got, slices.Collect(maps.Keys(want))), want)
			}
			for i, wantNames := range []map[string]string{
				{"TS_HOSTNAME": "tsrelay-0", "TS_KUBE_SECRET": "tsrelay-0-state", "TS_RELAY_SERVICE": "tsrelay-0"},
				{"TS_HOSTNAME": "tsrelay-1", "TS_KUBE_SECRET": "tsrelay-1-state", "TS_RELAY_SERVICE": "tsrelay-1"},
			} {
				got := expandEnv(c.Env, "tsrelay-"+strconv.Itoa(i))
				if !submap(wantNames, got) {
					t.Errorf("pod tsrelay-%d gets %v, want %v", i, pick(got, slices.Collect(maps.Keys(wantNames))), wantNames)
				}
			}
			mesh := map[string]string{"TS_DERP_MESH_SECRET": meshSecret, "TS_DERP_MESH_PEERS": "tsrelay-0,tsrelay-1"}
			if got := pick(envValues(c.Env), slices.Collect(maps.Keys(mesh))); tc.derp != submap(mesh, got) || (!tc.derp && len(got) > 0) {
				t.Errorf("mesh env %v; want %v with ha-derp only", got, mesh)
			}

			if errs := replicaNameErrors(h); len(errs) > 0 {
				t.Errorf("the replicas' names disagree:\n%s", strings.Join(errs, "\n"))
			}

			checkPerRelayServices(t, h, tc.derp)
			checkSpread(t, sts)
			if len(h.pdbs) != 1 {
				t.Fatalf("%d PodDisruptionBudgets, want 1", len(h.pdbs))
			}
			pdb := h.pdbs[0]
			if mu := pdb.Spec.MaxUnavailable; mu == nil || mu.String() != "1" || pdb.Spec.MinAvailable != nil {
				t.Errorf("PodDisruptionBudget maxUnavailable %v, minAvailable %v; want maxUnavailable 1", mu, pdb.Spec.MinAvailable)
			}
			if !subset(pdb.Spec.Selector.MatchLabels, podLabels) {
				t.Errorf("PodDisruptionBudget selector %v does not match the pod labels %v", pdb.Spec.Selector.MatchLabels, podLabels)
			}
		})
	}
}

// TestHAPodTemplateIsTheBase checks that the HA pod template is the single
// relay's but for what components/ha means to change: the per-replica
// names and the spread across nodes.
func TestHAPodTemplateIsTheBase(t *testing.T) {
	objs, err := kubetest.ReadManifests("install.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var dep appsv1.Deployment
	for _, o := range objs {
		if o.GetKind() == "Deployment" {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &dep); err != nil {
				t.Fatal(err)
			}
		}
	}
	h := parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", haExample))
	perReplica := func(e corev1.EnvVar) bool {
		return e.Name == "TS_HOSTNAME" || e.Name == "TS_KUBE_SECRET" || e.Name == "TS_RELAY_SERVICE"
	}
	want, got := dep.Spec.Template.DeepCopy(), h.sts.Spec.Template.DeepCopy()
	want.Spec.Containers[0].Env = slices.DeleteFunc(want.Spec.Containers[0].Env, perReplica)
	got.Spec.Containers[0].Env = slices.DeleteFunc(got.Spec.Containers[0].Env, perReplica)
	got.Spec.TopologySpreadConstraints = nil
	if !equality.Semantic.DeepEqual(got, want) {
		w, _ := yaml.Marshal(want)
		g, _ := yaml.Marshal(got)
		t.Errorf("the StatefulSet's pod template differs from the Deployment's beyond the per-replica env and the spread (- as install.yaml's Deployment):\n%s",
			firstDifference(string(w), string(g)))
	}
}

// TestHAReplicaNamesMustAgree shows that replicaNameErrors catches the
// mistakes "Changing the number of relays" warns of: more replicas than
// names elsewhere, a Service too few, a Role name too few, a stale mesh
// peer list.
func TestHAReplicaNamesMustAgree(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(h *haObjects)
		want   string // in one of the errors
	}{
		{"replicas 3, nothing else", func(h *haObjects) { *h.sts.Spec.Replicas = 3 }, "TS_RELAY_SERVICE=tsrelay-2, but there is no such Service"},
		{"replicas 1, names of 2", func(h *haObjects) { *h.sts.Spec.Replicas = 1 }, "Service tsrelay-1 selects a single pod"},
		{"a Service missing", func(h *haObjects) { delete(h.services, "tsrelay-1") }, "no such Service"},
		{"a Service without the label", func(h *haObjects) { delete(h.services["tsrelay-1"].Labels, componentLabel) }, "Service tsrelay-1 lacks the label"},
		{"a Role name missing", func(h *haObjects) {
			h.role.Rules[0].ResourceNames = h.role.Rules[0].ResourceNames[:1]
		}, "on Secrets"},
		{"mesh peers stale", func(h *haObjects) {
			for i, e := range h.sts.Spec.Template.Spec.Containers[0].Env {
				if e.Name == "TS_DERP_MESH_PEERS" {
					h.sts.Spec.Template.Spec.Containers[0].Env[i].Value = "tsrelay-0"
				}
			}
		}, "TS_DERP_MESH_PEERS=tsrelay-0,"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", haDERPExample))
			if errs := replicaNameErrors(h); len(errs) > 0 {
				t.Fatalf("unchanged examples/ha-derp: %v", errs)
			}
			tc.change(h)
			errs := replicaNameErrors(h)
			if !slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, tc.want) }) {
				t.Errorf("replicaNameErrors = %q, want one containing %q", errs, tc.want)
			}
		})
	}
}

// checkEnvOrder checks that every $(NAME) in an env value names a variable
// listed before it: Kubernetes expands only those, and leaves any other
// reference as literal text (TS_KUBE_SECRET would then be "$(POD_NAME)-state",
// which the relay rejects). POD_NAME must come from the pod's name.
func checkEnvOrder(t *testing.T, env []corev1.EnvVar) {
	t.Helper()
	seen := map[string]bool{}
	for _, e := range env {
		for _, m := range varRef.FindAllStringSubmatch(e.Value, -1) {
			if !seen[m[1]] {
				t.Errorf("env %s=%s refers to %s, which is not listed before it: Kubernetes would not expand it", e.Name, e.Value, m[1])
			}
		}
		if e.Name == "POD_NAME" && (e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.name") {
			t.Errorf("env POD_NAME is not the downward API's metadata.name: %+v", e)
		}
		if seen[e.Name] {
			t.Errorf("env %s is listed twice", e.Name)
		}
		seen[e.Name] = true
	}
}

// checkPerRelayServices checks tsrelay-0 and tsrelay-1: LoadBalancers with
// the single relay's settings, each selecting exactly its pod, with the
// relay port (and, with DERP, DERP and STUN) on the container's ports.
func checkPerRelayServices(t *testing.T, h *haObjects, derp bool) {
	t.Helper()
	c := h.relayContainer(t)
	containerPorts := map[string]corev1.ContainerPort{}
	for _, p := range c.Ports {
		containerPorts[p.Name] = p
	}
	env := envValues(c.Env)
	want := []struct{ name, env string }{{"relay", "TS_RELAY_SERVER_PORT"}}
	if derp {
		want = append(want, struct{ name, env string }{"derp", "TS_DERP_PORT"}, struct{ name, env string }{"stun", "TS_STUN_PORT"})
	}
	for i := range 2 {
		name := "tsrelay-" + strconv.Itoa(i)
		svc := h.services[name]
		if svc == nil {
			t.Errorf("no Service %s", name)
			continue
		}
		wantSel := map[string]string{"app.kubernetes.io/name": "tsrelay", appsv1.StatefulSetPodNameLabel: name}
		if !maps.Equal(svc.Spec.Selector, wantSel) {
			t.Errorf("Service %s selector %v, want exactly %v", name, svc.Spec.Selector, wantSel)
		}
		if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal ||
			svc.Spec.IPFamilyPolicy == nil || *svc.Spec.IPFamilyPolicy != corev1.IPFamilyPolicyPreferDualStack {
			t.Errorf("Service %s: type %s, externalTrafficPolicy %s, ipFamilyPolicy %v; want the base Service's LoadBalancer, Local, PreferDualStack",
				name, svc.Spec.Type, svc.Spec.ExternalTrafficPolicy, svc.Spec.IPFamilyPolicy)
		}
		if svc.Annotations["metallb.io/loadBalancerIPs"] == "" {
			t.Errorf("Service %s has no MetalLB address in the example", name)
		}
		byTarget := map[string]corev1.ServicePort{}
		for _, p := range svc.Spec.Ports {
			byTarget[p.TargetPort.String()] = p
		}
		if len(byTarget) != len(want) {
			t.Errorf("Service %s ports %v, want exactly %v", name, svc.Spec.Ports, want)
		}
		for _, w := range want {
			cp, sp := containerPorts[w.name], byTarget[w.name]
			if env[w.env] != strconv.Itoa(int(cp.ContainerPort)) {
				t.Errorf("%s=%q, container port %s = %d; want them equal", w.env, env[w.env], w.name, cp.ContainerPort)
			}
			if sp.Port != cp.ContainerPort || sp.Protocol != cp.Protocol {
				t.Errorf("Service %s port for %s = %d/%s, want %d/%s", name, w.name, sp.Port, sp.Protocol, cp.ContainerPort, cp.Protocol)
			}
		}
	}
}

// checkSpread checks the topology spread: one relay per node where there
// are several, not blocked by tainted (dead, cordoned) nodes.
func checkSpread(t *testing.T, sts *appsv1.StatefulSet) {
	t.Helper()
	tscs := sts.Spec.Template.Spec.TopologySpreadConstraints
	if len(tscs) != 1 {
		t.Fatalf("%d topologySpreadConstraints, want 1", len(tscs))
	}
	c := tscs[0]
	if c.TopologyKey != corev1.LabelHostname || c.MaxSkew != 1 {
		t.Errorf("spread over %q with maxSkew %d, want %s and 1", c.TopologyKey, c.MaxSkew, corev1.LabelHostname)
	}
	if c.NodeTaintsPolicy == nil || *c.NodeTaintsPolicy != corev1.NodeInclusionPolicyHonor {
		t.Errorf("nodeTaintsPolicy %v, want Honor: a dead node's taint must leave it out of the skew", c.NodeTaintsPolicy)
	}
	if c.LabelSelector == nil || !subset(c.LabelSelector.MatchLabels, sts.Spec.Template.Labels) {
		t.Errorf("spread labelSelector %v does not match the pod labels %v", c.LabelSelector, sts.Spec.Template.Labels)
	}
}

func envValues(env []corev1.EnvVar) map[string]string {
	m := map[string]string{}
	for _, e := range env {
		m[e.Name] = e.Value
	}
	return m
}

// submap reports whether every key of want has its value in got.
func submap(want, got map[string]string) bool {
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			return false
		}
	}
	return true
}

// pick returns the entries of m with the given keys.
func pick(m map[string]string, keys []string) map[string]string {
	out := map[string]string{}
	for _, k := range keys {
		if v, ok := m[k]; ok {
			out[k] = v
		}
	}
	return out
}

// TestHAThreeReplicas follows "Changing the number of relays" in
// components/ha to the letter, in a kustomization of its own next to
// components/ha, derp and ha-derp, and checks that the result agrees
// everywhere and gives the third relay a Service like the others'.
func TestHAThreeReplicas(t *testing.T) {
	dir := t.TempDir()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(dir, repo)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"kustomization.yaml": `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: kube-public
resources:
- ` + rel + `/manifests
- service-tsrelay-2.yaml
components:
- ` + rel + `/manifests/components/ha
- ` + rel + `/manifests/components/derp
- ` + rel + `/manifests/components/ha-derp
replicas:
- name: tsrelay
  count: 3
patches:
- path: role.yaml
- patch: |-
    apiVersion: apps/v1
    kind: StatefulSet
    metadata:
      name: tsrelay
    spec:
      template:
        spec:
          containers:
            - name: relay
              env:
                - name: TS_DERP_MESH_PEERS
                  value: tsrelay-0,tsrelay-1,tsrelay-2
`,
		"service-tsrelay-2.yaml": `apiVersion: v1
kind: Service
metadata:
  name: tsrelay-2
  labels:
    app.kubernetes.io/name: tsrelay
    app.kubernetes.io/component: relay
spec:
  selector:
    app.kubernetes.io/name: tsrelay
    statefulset.kubernetes.io/pod-name: tsrelay-2
`,
		"role.yaml": `apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: tsrelay
rules:
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [tsrelay-0-state, tsrelay-1-state, tsrelay-2-state]
    verbs: [get, update, watch]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [create]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    resourceNames: [tsrelay-0-state, tsrelay-1-state, tsrelay-2-state]
    verbs: [get, update]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [create]
  - apiGroups: [""]
    resources: [services]
    resourceNames: [tsrelay-0, tsrelay-1, tsrelay-2]
    verbs: [get, list, watch]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch]
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [tsrelay-derp-mesh]
    verbs: [get, update]
`,
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	h := parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", dir))
	if r := h.sts.Spec.Replicas; r == nil || *r != 3 {
		t.Fatalf("replicas = %v, want 3", r)
	}
	if errs := replicaNameErrors(h); len(errs) > 0 {
		t.Errorf("the documented steps for 3 relays leave names that disagree:\n%s", strings.Join(errs, "\n"))
	}
	one, three := h.services["tsrelay-1"], h.services["tsrelay-2"]
	if three == nil {
		t.Fatal("no Service tsrelay-2")
	}
	if !equality.Semantic.DeepEqual(one.Spec.Ports, three.Spec.Ports) || one.Spec.Type != three.Spec.Type ||
		one.Spec.ExternalTrafficPolicy != three.Spec.ExternalTrafficPolicy || !equality.Semantic.DeepEqual(one.Spec.IPFamilyPolicy, three.Spec.IPFamilyPolicy) {
		t.Errorf("Service tsrelay-2 spec %+v, want the settings and ports of tsrelay-1's %+v", three.Spec, one.Spec)
	}
	if len(three.Spec.Ports) != 3 {
		t.Errorf("Service tsrelay-2 ports %v, want relay, derp and stun", three.Spec.Ports)
	}

	// Without the label, tsrelay-2 must get no ports at all, so that the
	// API server refuses it (spec.ports: Required value), rather than the
	// DERP and STUN ports without the relay's, which it would take.
	unlabelled := strings.Replace(files["service-tsrelay-2.yaml"], "    "+componentLabel+": relay\n", "", 1)
	if unlabelled == files["service-tsrelay-2.yaml"] {
		t.Fatal("the test's Service tsrelay-2 has no label to remove")
	}
	if err := os.WriteFile(filepath.Join(dir, "service-tsrelay-2.yaml"), []byte(unlabelled), 0o600); err != nil {
		t.Fatal(err)
	}
	h = parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", dir))
	if svc := h.services["tsrelay-2"]; svc == nil || len(svc.Spec.Ports) != 0 || svc.Spec.Type != "" {
		t.Errorf("unlabelled Service tsrelay-2 = %+v, want no ports and no type, which the API server refuses", svc)
	}
}

// TestHAWithMonitoring checks that components/monitoring needs no change
// for the HA install: its metrics Service selects every replica's pod (so
// Prometheus scrapes each, labelled with its pod name) on the pod's http
// port.
func TestHAWithMonitoring(t *testing.T) {
	dir := t.TempDir()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(dir, repo)
	if err != nil {
		t.Fatal(err)
	}
	k := "namespace: kube-public\nresources: [" + rel + "/manifests]\ncomponents: [" +
		rel + "/manifests/components/ha, " + rel + "/manifests/components/monitoring]\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	h := parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", dir))
	m := h.services["tsrelay-metrics"]
	if m == nil {
		t.Fatalf("no Service tsrelay-metrics: %v", h.kinds)
	}
	if !subset(m.Spec.Selector, h.sts.Spec.Template.Labels) {
		t.Errorf("metrics Service selector %v does not match the replicas' pod labels %v", m.Spec.Selector, h.sts.Spec.Template.Labels)
	}
	if _, ok := m.Spec.Selector[appsv1.StatefulSetPodNameLabel]; ok {
		t.Errorf("metrics Service selects one replica only: %v", m.Spec.Selector)
	}
	var http bool
	for _, p := range h.relayContainer(t).Ports {
		http = http || (p.Name == m.Spec.Ports[0].TargetPort.String())
	}
	if !http {
		t.Errorf("metrics Service targets port %s, which the replicas' container lacks", m.Spec.Ports[0].TargetPort.String())
	}
}

// TestHADERPEitherOrder checks what components/derp's comment says:
// listed before components/ha, its ports and env still reach the
// StatefulSet and every per-relay Service (copied from the Deployment and
// Service), as they do listed after it.
func TestHADERPEitherOrder(t *testing.T) {
	render := func(components ...string) *haObjects {
		t.Helper()
		dir := t.TempDir()
		repo, err := filepath.Abs("..")
		if err != nil {
			t.Fatal(err)
		}
		rel, err := filepath.Rel(dir, repo)
		if err != nil {
			t.Fatal(err)
		}
		k := "namespace: kube-public\nresources: [" + rel + "/manifests]\ncomponents:\n"
		for _, c := range components {
			k += "- " + rel + "/manifests/components/" + c + "\n"
		}
		if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
			t.Fatal(err)
		}
		return parseHA(t, kubetest.KustomizeObjectsForTest(t, "..", dir))
	}
	after, before := render("ha", "derp", "ha-derp"), render("derp", "ha", "ha-derp")
	if a, b := envValues(after.relayContainer(t).Env), envValues(before.relayContainer(t).Env); !maps.Equal(a, b) {
		t.Errorf("env with derp after ha %v, before %v", a, b)
	}
	checkEnvOrder(t, before.relayContainer(t).Env)
	ports := func(h *haObjects) map[string]string {
		m := map[string]string{}
		for _, p := range h.relayContainer(t).Ports {
			m["container "+p.Name] = fmt.Sprintf("%d/%s", p.ContainerPort, p.Protocol)
		}
		for _, name := range []string{"tsrelay-0", "tsrelay-1"} {
			for _, p := range h.services[name].Spec.Ports {
				m[name+" "+p.Name] = fmt.Sprintf("%d/%s->%s", p.Port, p.Protocol, p.TargetPort.String())
			}
		}
		return m
	}
	a, b := ports(after), ports(before)
	if !maps.Equal(a, b) {
		t.Errorf("ports with derp after ha %v, before %v", a, b)
	}
	if len(a) != 10 { // relay, http, derp, stun on the container; relay, derp, stun on each Service
		t.Errorf("ports %v, want relay, http, derp and stun on the container and relay, derp, stun on each Service", a)
	}
}
