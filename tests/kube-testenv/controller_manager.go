package main

// kube-controller-manager, run in this process once the apiserver is ready.
//
// In-process rather than a second binary: the controller manager's packages are almost all
// already linked into the apiserver (client-go, apimachinery, k8s.io/kubernetes/pkg/...),
// so adding it costs ~15 MB of binary and seconds of build, where a second binary would cost
// a second link of ~100 MB and a second process to supervise and clean up. Kubernetes' own
// integration tests run both servers in one process the same way
// (cmd/kube-controller-manager/app/testing). It is configured through its own flags only.

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/pflag"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
)

// defaultControllers are the controllers the tests rely on; the rest of the default set
// needs nodes, volumes or cloud providers that do not exist here, and would only slow the
// start. Override with --controllers.
var defaultControllers = []string{
	"garbage-collector-controller",             // ownerReferences: cascading deletion
	"namespace-controller",                     // deleted namespaces are emptied and go away
	"serviceaccount-controller",                // the "default" ServiceAccount of each namespace
	"root-ca-certificate-publisher-controller", // kube-root-ca.crt, which pod token volumes use
	"deployment-controller",                    // Deployments get ReplicaSets
	"replicaset-controller",                    // ReplicaSets get Pods (never scheduled: no node)
	"disruption-controller",                    // PodDisruptionBudget status
	"clusterrole-aggregation-controller",       // aggregate-to-admin/edit/view ClusterRoles
}

func init() {
	// Both servers share the process-wide logging configuration: applying the same one twice
	// is harmless and must not be an error.
	logsapi.ReapplyHandling = logsapi.ReapplyHandlingIgnoreUnchanged
}

// controllerManagerArgs are the flags a kubeadm cluster gives kube-controller-manager, minus
// serving (nothing scrapes it) and leader election (there is one instance).
func controllerManagerArgs(kubeconfig, caCert string, controllers []string, verbosity int) []string {
	return []string{
		"--kubeconfig=" + kubeconfig,
		"--controllers=" + strings.Join(controllers, ","),
		// Each controller acts as its own ServiceAccount in kube-system, with the bootstrap
		// RBAC roles a real cluster gives it: a test sees the permissions production has.
		"--use-service-account-credentials=true",
		"--root-ca-file=" + caCert,
		"--leader-elect=false",
		"--secure-port=0",
		fmt.Sprintf("--v=%d", verbosity),
	}
}

// startControllerManager runs kube-controller-manager until ctx is cancelled; the returned
// channel yields its exit error (nil on a clean stop) and is then closed.
func startControllerManager(ctx context.Context, args []string) (<-chan error, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	all, disabled, aliases := app.KnownControllers(), app.ControllersDisabledByDefault(), app.ControllerAliases()
	fs := pflag.NewFlagSet("kube-controller-manager", pflag.ContinueOnError)
	namedFlagSets := s.Flags(all, disabled, aliases)
	for _, f := range namedFlagSets.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("kube-controller-manager flags: %w", err)
	}
	s.ParsedFlags = &namedFlagSets
	if err := s.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	c, err := s.Config(ctx, all, disabled, aliases)
	if err != nil {
		return nil, fmt.Errorf("kube-controller-manager config: %w", err)
	}
	done := make(chan error, 1)
	go func() {
		defer close(done)
		done <- app.Run(ctx, c.Complete())
	}()
	return done, nil
}
