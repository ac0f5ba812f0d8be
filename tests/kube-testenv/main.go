// Command kube-testenv runs a real Kubernetes API server for pgrelief's test suite.
//
// It starts etcd in-process (go.etcd.io/etcd/server/v3/embed), a kube-apiserver from
// k8s.io/kubernetes, and, once the apiserver is ready, kube-controller-manager in the same
// process, each driven through its own command-line flags exactly as the released binaries
// would be. Everything listens on 127.0.0.1 on free ports. At start it generates a CA and
// serving certificate, a service-account signing key, an admin token (user "admin", group
// "system:masters") and a controller-manager token, writes a kubeconfig to --kubeconfig, and
// prints READY on stdout once /readyz answers 200 and the controllers run (the "default"
// ServiceAccount exists). On SIGTERM/SIGINT (or EOF on stdin with --exit-on-stdin-eof) it
// stops the controller manager, the apiserver, then etcd, and removes its work directory.
//
// Extra kube-apiserver flags can be given after "--"; they override the defaults.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	"k8s.io/component-base/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

type options struct {
	kubeconfig     string
	workDir        string
	port           int
	keepWorkDir    bool
	exitOnStdinEOF bool
	readyTimeout   time.Duration
	verbosity      int
	controllers    string
	crds           pathList
}

// pathList is a repeatable flag.
type pathList []string

func (l *pathList) String() string     { return strings.Join(*l, ",") }
func (l *pathList) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	os.Exit(run())
}

func run() int {
	var o options
	fs := flag.NewFlagSet("kube-testenv", flag.ContinueOnError)
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "where to write the admin kubeconfig (required)")
	fs.StringVar(&o.workDir, "work-dir", "", "directory for certs, keys and etcd data (default: a new temp dir, removed at exit)")
	fs.IntVar(&o.port, "port", 0, "apiserver secure port on 127.0.0.1 (0: pick a free one)")
	fs.BoolVar(&o.keepWorkDir, "keep-work-dir", false, "do not remove the work directory at exit")
	fs.BoolVar(&o.exitOnStdinEOF, "exit-on-stdin-eof", false, "shut down when stdin is closed (parent died)")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 120*time.Second, "give up if /readyz is not 200 by then")
	fs.IntVar(&o.verbosity, "v", 0, "kube-apiserver and kube-controller-manager log verbosity")
	fs.StringVar(&o.controllers, "controllers", strings.Join(defaultControllers, ","),
		"kube-controller-manager's --controllers (\"\": no controller manager)")
	fs.Var(&o.crds, "crds", "a CRD manifest file, or a directory of them, to install before the "+
		"controller manager starts, so the garbage collector watches it at once (repeatable)")
	showVersion := fs.Bool("version", false, "print the Kubernetes version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Println(version.Get().GitVersion)
		return 0
	}
	if o.kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "kube-testenv: --kubeconfig is required")
		return 2
	}
	code, err := serve(o, fs.Args())
	if err != nil {
		fmt.Fprintf(os.Stderr, "kube-testenv: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

func serve(o options, extraArgs []string) (int, error) {
	createdWorkDir := false
	if o.workDir == "" {
		d, err := os.MkdirTemp("", "kube-testenv-")
		if err != nil {
			return 1, err
		}
		o.workDir = d
		createdWorkDir = true
	} else if err := os.MkdirAll(o.workDir, 0o700); err != nil {
		return 1, err
	}
	defer func() {
		if createdWorkDir && !o.keepWorkDir {
			_ = os.RemoveAll(o.workDir)
		} else if !o.keepWorkDir {
			_ = os.RemoveAll(filepath.Join(o.workDir, "etcd"))
		}
	}()

	ports, err := freePorts(3)
	if err != nil {
		return 1, err
	}
	if o.port == 0 {
		o.port = ports[0]
	}
	etcdClientURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	etcdPeerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[2])
	serverURL := fmt.Sprintf("https://127.0.0.1:%d", o.port)

	pki, err := writePKI(o.workDir)
	if err != nil {
		return 1, fmt.Errorf("generating certificates: %w", err)
	}

	etcd, err := startEtcd(filepath.Join(o.workDir, "etcd"), etcdClientURL, etcdPeerURL)
	if err != nil {
		return 1, fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		etcd.Close()
	}()

	if err := writeKubeconfig(o.kubeconfig, serverURL, pki, "admin", pki.adminToken); err != nil {
		return 1, fmt.Errorf("writing kubeconfig: %w", err)
	}
	if err := writeKubeconfig(pki.kcmKubeconfig, serverURL, pki, kcmUser, pki.kcmToken); err != nil {
		return 1, fmt.Errorf("writing the controller manager's kubeconfig: %w", err)
	}

	args := []string{
		"--etcd-servers=" + etcdClientURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", o.port),
		"--cert-dir=" + filepath.Join(o.workDir, "apiserver-certs"),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--token-auth-file=" + pki.tokenFile,
		"--authorization-mode=RBAC",
		"--anonymous-auth=false",
		"--service-account-issuer=" + serverURL,
		"--service-account-key-file=" + pki.saKey,
		"--service-account-signing-key-file=" + pki.saKey,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		// The endpoints reconciler would write 127.0.0.1 into default/kubernetes Endpoints,
		// which validation forbids (loopback); there is no Service network here anyway.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		fmt.Sprintf("--v=%d", o.verbosity),
	}
	runControllers := o.controllers != ""
	if !runControllers {
		// Without the controller manager nothing creates the "default" ServiceAccount of a
		// namespace, and ServiceAccount admission would reject every Pod.
		args = append(args, "--disable-admission-plugins=ServiceAccount")
	}
	args = append(args, extraArgs...)

	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(args)
	// kube-apiserver installs its own SIGTERM/SIGINT handler when the command is created.
	// Take the signals over so that shutdown goes in a real cluster's order: the controller
	// manager first, while the apiserver still answers (its token refresh for the
	// per-controller ServiceAccounts would otherwise wait ~10 s on a vanished apiserver),
	// then the apiserver (genericapiserver.RequestShutdown is its own "signal received"),
	// then etcd. A second signal exits at once.
	signal.Reset(syscall.SIGTERM, syscall.SIGINT)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan int, 1)
	go func() { done <- cli.Run(cmd) }()

	if o.exitOnStdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		}()
	}

	readyCtx, cancelReady := context.WithTimeout(context.Background(), o.readyTimeout)
	defer cancelReady()
	kcmCtx, stopControllers := context.WithCancel(context.Background())
	defer stopControllers()
	kcmStarted := make(chan (<-chan error), 1)
	readyErr := make(chan error, 1)
	go func() {
		if err := waitReady(readyCtx, serverURL, pki); err != nil {
			readyErr <- err
			return
		}
		if err := installCRDs(readyCtx, serverURL, pki, o.crds); err != nil {
			readyErr <- fmt.Errorf("installing --crds: %w", err)
			return
		}
		if runControllers {
			kcmArgs := controllerManagerArgs(pki.kcmKubeconfig, pki.caCert,
				strings.Split(o.controllers, ","), o.verbosity)
			kcmDone, err := startControllerManager(kcmCtx, kcmArgs)
			if err != nil {
				readyErr <- fmt.Errorf("kube-controller-manager: %w", err)
				return
			}
			kcmStarted <- kcmDone
			if err := waitDefaultServiceAccount(readyCtx, serverURL, pki, kcmDone); err != nil {
				readyErr <- err
				return
			}
		}
		readyErr <- nil
	}()

	var kcmDone <-chan error
	shutdown := func() (int, error) {
		signal.Stop(sigs)
		go func() {
			<-sigs
			os.Exit(1)
		}()
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		cancelReady()
		stopControllers()
		var kcmErr error
		if kcmDone != nil {
			kcmErr = awaitControllers(kcmDone, 15*time.Second)
		}
		genericapiserver.RequestShutdown()
		code := awaitExit(done, 30*time.Second)
		if kcmErr != nil && code == 0 {
			return 1, kcmErr
		}
		return code, nil
	}

	for {
		select {
		case kcmDone = <-kcmStarted:
		case err := <-readyErr:
			if err != nil {
				code, _ := shutdown()
				return max(code, 1), fmt.Errorf("not ready: %w", err)
			}
			fmt.Println("READY")
			readyErr = nil
		case code := <-done:
			if code != 0 {
				return code, fmt.Errorf("kube-apiserver exited with code %d", code)
			}
			return 0, nil
		case <-sigs:
			return shutdown()
		}
	}
}

// awaitExit waits for the apiserver command to return after it was signalled.
func awaitExit(done <-chan int, timeout time.Duration) int {
	select {
	case <-done:
		return 0
	case <-time.After(timeout):
		fmt.Fprintln(os.Stderr, "kube-testenv: kube-apiserver did not stop in time")
		return 1
	}
}

// awaitControllers waits for kube-controller-manager to return after its context ended.
func awaitControllers(done <-chan error, timeout time.Duration) error {
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("kube-controller-manager: %w", err)
		}
		return nil
	case <-time.After(timeout):
		return errors.New("kube-controller-manager did not stop in time")
	}
}

// waitDefaultServiceAccount returns once the serviceaccount controller has created
// default/default: the controllers are running, and Pods pass ServiceAccount admission.
func waitDefaultServiceAccount(ctx context.Context, serverURL string, p *pkiFiles, kcmDone <-chan error) error {
	client, err := adminClient(p)
	if err != nil {
		return err
	}
	url := serverURL + "/api/v1/namespaces/default/serviceaccounts/default"
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+p.adminToken)
		if resp, err := client.Do(req); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-kcmDone:
			return fmt.Errorf("kube-controller-manager exited: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("no default ServiceAccount from kube-controller-manager: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func adminClient(p *pkiFiles) (*http.Client, error) {
	caPEM, err := os.ReadFile(p.caCert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}, nil
}

func waitReady(ctx context.Context, serverURL string, p *pkiFiles) error {
	client, err := adminClient(p)
	if err != nil {
		return err
	}
	var last string
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, serverURL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+p.adminToken)
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("status %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %s)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func startEtcd(dir, clientURL, peerURL string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "kube-testenv"
	cfg.Dir = dir
	cu, _ := url.Parse(clientURL)
	pu, _ := url.Parse(peerURL)
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}
	// Test data is thrown away at exit: skip fsync for speed.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("etcd not ready after 60s")
	}
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
